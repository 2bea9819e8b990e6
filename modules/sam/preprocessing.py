"""SAM v1 and SAM 2 image preprocessing, split so that only uint8 pixels cross process boundaries.

``prepare`` (CPU, picklable) runs in DataLoader workers; ``finish`` does the float work on the
device that encodes. Both halves are pure: safe to ship to workers instead of the backbone.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.transforms import Normalize, Resize

from modules.sam.base import BackboneError, checked_hw

#: ``SAM2Transforms`` normalisation (pixels scaled to [0, 1] first).
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)


def check_image(image: np.ndarray) -> None:
    """Raise ``BackboneError`` unless ``image`` is a non-empty ``H x W x 3`` uint8 array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise BackboneError(f"preprocess expects an H x W x 3 uint8 array, got shape {shape}")
    if image.dtype != np.uint8:
        raise BackboneError(f"preprocess expects an H x W x 3 uint8 array, got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise BackboneError(f"preprocess got an empty image of shape {image.shape}")


class SplitPreprocessor(abc.ABC):
    """A preprocessing split in two halves, so that only uint8 pixels cross process boundaries:
    ``prepare`` (CPU, picklable, runs in DataLoader workers) and ``finish`` (float work, on the
    device that encodes). Calling the preprocessor runs both on the CPU. The halves are the
    operations of the library's own preprocessing in its order, so any device gives its encoder
    input up to that device's arithmetic."""

    image_size: int

    @abc.abstractmethod
    def input_size(self, original_hw) -> tuple[int, int]:
        """``(h, w)`` of the resized image inside the ``S x S`` input, before any padding."""

    @abc.abstractmethod
    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB -> ``3 x h x w`` uint8 (CPU, picklable)."""

    def finish(self, prepared: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """``prepare`` outputs (on any device) -> ``B x 3 x S x S`` float32 encoder input on ``device``."""
        return torch.stack([self._finish_one(pixels.to(device, non_blocking=True)) for pixels in prepared])

    @abc.abstractmethod
    def _finish_one(self, pixels: torch.Tensor) -> torch.Tensor:
        """One ``prepare`` output on the device -> ``3 x S x S`` float32 encoder input."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB -> ``3 x S x S`` float32 encoder input (CPU)."""
        return self.finish([self.prepare(image)])[0]


@dataclass(frozen=True)
class SamPreprocessor(SplitPreprocessor):
    """SAM v1 preprocessing, exactly as ``SamPredictor.set_image`` + ``Sam.preprocess``.

    ``ResizeLongestSide(image_size)`` (PIL bilinear resize of the uint8 image), per-channel
    normalisation with ``pixel_mean`` / ``pixel_std`` (0-255 scale), then zero padding at the
    bottom and right to ``image_size x image_size``.
    """

    image_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    def input_size(self, original_hw) -> tuple[int, int]:
        """``(h, w)`` of the resized image inside the padded ``S x S`` input."""
        height, width = checked_hw(original_hw)
        return ResizeLongestSide.get_preprocess_shape(height, width, self.image_size)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB -> ``3 x h x w`` uint8 resized (``input_size``), not padded."""
        check_image(image)
        resized = ResizeLongestSide(self.image_size).apply_image(np.ascontiguousarray(image))
        return torch.from_numpy(resized).permute(2, 0, 1).contiguous()

    def _finish_one(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.pixel_mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.pixel_std, device=pixels.device).view(3, 1, 1)
        pixels = (pixels.float() - mean) / std
        pad_h = self.image_size - pixels.shape[1]
        pad_w = self.image_size - pixels.shape[2]
        return F.pad(pixels, (0, pad_w, 0, pad_h)).contiguous()


@dataclass(frozen=True)
class Sam2Preprocessor(SplitPreprocessor):
    """SAM 2 preprocessing, exactly as ``SAM2ImagePredictor`` (``SAM2Transforms``).

    ``ToTensor`` (uint8 -> [0, 1]), ``Resize((S, S))`` on the float tensor (bilinear, antialias
    as torchvision's default for tensors), then normalisation with ``pixel_mean`` / ``pixel_std``
    (0-1 scale). No aspect preservation and no padding. The resize works on floats, so
    ``prepare`` hands over the original-size uint8 image.
    """

    image_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    def input_size(self, original_hw) -> tuple[int, int]:
        """The whole ``S x S`` input is image (SAM 2 stretches, it does not pad)."""
        checked_hw(original_hw)
        return (self.image_size, self.image_size)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB -> ``3 x H x W`` uint8 (the resize happens in ``finish``)."""
        check_image(image)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()

    def _finish_one(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.float().div(255)  # what ToTensor does with a uint8 array
        pixels = Resize((self.image_size, self.image_size))(pixels)
        pixels = Normalize(self.pixel_mean, self.pixel_std)(pixels)
        return pixels.float().contiguous()
