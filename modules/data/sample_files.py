"""Where a sample's image and mask files are, in a form that survives moving the data.

The manifests (and the training index built from them) store each path relative to the data root
it was found under: ``image_path`` under ``data.images_root``, ``mask_path`` under
``data.masks_root`` (layout ``split_roots``) or ``data.images_root`` (layout ``per_group``). A
project whose data is copied to another disk (a cluster node's local scratch) or whose folder is
moved then keeps every manifest, prompt set, cache entry and model: only the roots in the config
change, and they are not an input of any stage. A path that lies outside its root, and every path
in a manifest written before paths were stored this way, stays absolute and resolves to itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from modules.data.manifest import load_split_manifest

#: The ``data`` keys that only say where the files are, not what they are.
LOCATION_KEYS = ("images_root", "masks_root", "project_root")


@dataclass(frozen=True)
class DataRoots:
    """The folders the stored ``image_path`` / ``mask_path`` of a manifest row are relative to."""

    images: Path
    masks: Path

    @classmethod
    def from_config(cls, data) -> DataRoots:
        """From a ``DataConfig``; abspath (not resolve) so that symlinked folders keep their names."""
        images = Path(os.path.abspath(data.images_root))
        masks = Path(os.path.abspath(data.masks_root)) if data.layout == "split_roots" else images
        return cls(images, masks)

    @staticmethod
    def _stored(path: str | os.PathLike, root: Path) -> str:
        try:
            return PurePosixPath(*Path(path).relative_to(root).parts).as_posix()
        except ValueError:
            return str(path)

    def stored_image(self, path: str | os.PathLike) -> str:
        """``path`` relative to the images root, with ``/`` separators (absolute outside it)."""
        return self._stored(path, self.images)

    def stored_mask(self, path: str | os.PathLike) -> str:
        return self._stored(path, self.masks)

    def image(self, stored: str) -> Path:
        """The image file a stored ``image_path`` names (an absolute one names itself)."""
        return self.images / stored

    def mask(self, stored: str) -> Path:
        return self.masks / stored

    def store(self, table: pd.DataFrame) -> pd.DataFrame:
        """A copy of ``table`` with its ``image_path`` / ``mask_path`` in the stored form."""
        stored = table.copy()
        stored["image_path"] = [self.stored_image(p) for p in table["image_path"]]
        stored["mask_path"] = [self.stored_mask(p) for p in table["mask_path"]]
        return stored

    def resolve(self, table: pd.DataFrame) -> pd.DataFrame:
        """A copy of ``table`` whose ``image_path`` / ``mask_path`` name the files (absolute)."""
        resolved = table.copy()
        resolved["image_path"] = [str(self.image(p)) for p in table["image_path"]]
        resolved["mask_path"] = [str(self.mask(p)) for p in table["mask_path"]]
        return resolved


def split_samples(cfg, split: str) -> pd.DataFrame:
    """The valid samples of one split (stage 1's manifest) with ``image_path`` / ``mask_path``
    naming the files under the configured roots."""
    return DataRoots.from_config(cfg.data).resolve(load_split_manifest(cfg.project_root, split))
