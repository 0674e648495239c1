"""The earlier home of `sdxs init`'s library half, now in `sdxs.model_folder`; these names stay as aliases."""

from sdxs.model_folder import assemble, find_tokenizer, resolve_component

__all__ = ["assemble", "find_tokenizer", "resolve_component"]
