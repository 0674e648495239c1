"""Model folders: the one place that reads, assembles, swaps components of, exports and publishes them.

A model folder is the hub layout that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads:
`model_index.json` whose `_class_name` is `["pipeline", "SDXSPipeline"]`, `pipeline.py` beside it (a byte copy of
`sdxs/pipeline.py`, the single source of truth) and one folder per component in safetensors.

    read.py   model folders: read_model_index, load_component, load_local_pipeline, load_base_pipeline,
              parameter_counts, describe (`sdxs info`);
              runs and checkpoints: checkpoint_dirs, find_checkpoint, trained_weights (the EMA rule),
              resolve_component, find_tokenizer; swapping: load_trained, check_fit, swap_component
    write.py  assemble (`sdxs init`), export_run (`sdxs export`), save_hub_layout, verify_hub_folder, model_card,
              push_folder (`sdxs push`), write_pipeline_file, sync_root_pipeline
              (`python -m sdxs.model_folder --sync-root`)

A package of two modules (not one file) so that each stays short; callers import from `sdxs.model_folder` only.
The module is the bottom of everything that touches a folder: it imports `sdxs.pipeline`, `sdxs.presets`,
`sdxs.runtime` and `sdxs.files`, and nothing of data/, train/, eval/, server/ or the CLI, which all call it.

Three rules live here once:
- EMA weights when present: a component taken from a training run or checkpoint is its EMA copy when the run kept
  one, unless the run's config says `ema.use_for_export = false` or the caller asks for `weights="raw"`
  (`sdxs export --weights raw`). `sdxs init` and `sdxs export` both follow it.
- Seeds: fresh (random) components come from `sdxs.presets.fresh_component`, each seeded on its own with `seed`.
- Building: a pipeline is constructed in two places only, fresh (`sdxs.presets.build_pipeline`) or from a folder
  (`load_local_pipeline`); every other pipeline is derived with diffusers' `from_pipe` (new components, the rest
  shared) or changed in place with `register_modules` (which keeps model_index.json in step).
"""

from sdxs.model_folder.read import (
    CHECKPOINT_PREFIX,
    PIPELINE_CONFIG_KEYS,
    check_fit,
    checkpoint_dirs,
    describe,
    find_checkpoint,
    find_tokenizer,
    load_base_pipeline,
    load_component,
    load_local_pipeline,
    load_trained,
    parameter_counts,
    read_model_index,
    resolve_component,
    swap_component,
    trained_weights,
)
from sdxs.model_folder.write import (
    COMPONENT_FOLDERS,
    EXPORT_DTYPES,
    LORA_FILE,
    PIPELINE_SOURCE,
    assemble,
    export_lora,
    export_run,
    main,
    model_card,
    push_folder,
    save_hub_layout,
    sync_root_pipeline,
    verify_hub_folder,
    write_pipeline_file,
)
from sdxs.pipeline import HUB_CLASS_NAME, drop_ignored_config_keys, write_hub_files

__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPONENT_FOLDERS",
    "EXPORT_DTYPES",
    "HUB_CLASS_NAME",
    "LORA_FILE",
    "PIPELINE_CONFIG_KEYS",
    "PIPELINE_SOURCE",
    "assemble",
    "check_fit",
    "checkpoint_dirs",
    "describe",
    "drop_ignored_config_keys",
    "export_lora",
    "export_run",
    "find_checkpoint",
    "find_tokenizer",
    "load_base_pipeline",
    "load_component",
    "load_local_pipeline",
    "load_trained",
    "main",
    "model_card",
    "parameter_counts",
    "push_folder",
    "read_model_index",
    "resolve_component",
    "save_hub_layout",
    "swap_component",
    "sync_root_pipeline",
    "trained_weights",
    "verify_hub_folder",
    "write_hub_files",
    "write_pipeline_file",
]
