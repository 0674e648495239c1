"""Data: image folders -> latent shards (`prepare`), training batches (`LatentShardLoader`), the emoji dataset."""

from sdxs.data.folder import FolderItem, scan_folder

__all__ = ["FolderItem", "LatentShardLoader", "scan_folder"]


def __getattr__(name: str):
    # The loader imports torch; keep `import sdxs.data` (and with it `sdxs --help`) light.
    if name == "LatentShardLoader":
        from sdxs.data.loader import LatentShardLoader

        return LatentShardLoader
    raise AttributeError(f"module 'sdxs.data' has no attribute {name!r}")
