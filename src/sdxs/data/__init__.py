"""Data: image folders -> latent shards (`prepare`), training batches (`LatentShardLoader`), the emoji dataset."""

from sdxs.data.folder import FolderItem, scan_folder
from sdxs.data.loader import LatentShardLoader

__all__ = ["FolderItem", "LatentShardLoader", "scan_folder"]
