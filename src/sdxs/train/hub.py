"""The earlier home of `sdxs export` / `sdxs push`, now in `sdxs.model_folder`; these names stay as aliases."""

from sdxs.model_folder import export_lora, export_run, model_card, push_folder, swap_component

__all__ = ["export_lora", "export_run", "model_card", "push_folder", "swap_component"]
