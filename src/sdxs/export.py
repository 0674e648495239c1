"""The earlier home of the export half of `sdxs.model_folder`, kept as an alias so `from sdxs.export import ...` and
`python -m sdxs.export --sync-root` (docs/pipeline.md) keep working. New code imports `sdxs.model_folder`."""

from sdxs.model_folder import (
    COMPONENT_FOLDERS,
    HUB_CLASS_NAME,
    PIPELINE_SOURCE,
    drop_ignored_config_keys,
    load_component,
    load_local_pipeline,
    main,
    read_model_index,
    save_hub_layout,
    sync_root_pipeline,
    verify_hub_folder,
    write_hub_files,
    write_pipeline_file,
)

__all__ = [
    "COMPONENT_FOLDERS",
    "HUB_CLASS_NAME",
    "PIPELINE_SOURCE",
    "drop_ignored_config_keys",
    "load_component",
    "load_local_pipeline",
    "read_model_index",
    "save_hub_layout",
    "sync_root_pipeline",
    "verify_hub_folder",
    "write_hub_files",
    "write_pipeline_file",
]

if __name__ == "__main__":
    main()
