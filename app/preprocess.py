"""Preprocessing shared by prediction and training: the brain mask, the crop around it, z-scores.

BraTS images are skull-stripped, so the brain is every voxel that is nonzero in any modality; outside it
the normalised image is 0, which is also what the network sees beyond the crop (zero padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Prediction keeps this many voxels of background around the brain's bounding box: the fast tiling reads
# them as context for the brain's edge (docs/ALGORITHM.md, Inference).
CROP_MARGIN = 4
# Training crops closer: its prepared arrays are padded by half a patch of zeros afterwards, which is the
# context an edge patch needs, so a wider margin would only store more background in every cached case.
TRAINING_CROP_MARGIN = 2


@dataclass
class BrainCrop:
    """A raw case cut down to its brain: ``image`` is the normalised (C, d, h, w) crop at ``box`` of the
    volume, ``mask`` the brain over that crop."""

    box: tuple[slice, ...]
    image: np.ndarray
    mask: np.ndarray


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels inside the skull-stripped brain: nonzero in any modality."""
    return np.any(image != 0, axis=0)


def normalise(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score each modality inside the brain; outside-brain voxels stay 0."""
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W) image, got shape {image.shape}")
    mask = brain_mask(image) if mask is None else mask
    out = np.zeros(image.shape, np.float32)
    if not mask.any():
        return out
    for c in range(image.shape[0]):
        values = image[c][mask].astype(np.float64)
        std = values.std()
        out[c][mask] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Tight box around ``mask`` grown by ``margin`` voxels (clipped to the volume)."""
    if not mask.any():
        raise ValueError("cannot take the bounding box of an empty mask")
    coords = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax))) for ax in range(mask.ndim)]
    return tuple(slice(max(int(c[0]) - margin, 0), min(int(c[-1]) + 1 + margin, n)) for c, n in zip(coords, mask.shape))


def crop_to_brain(image: np.ndarray, margin: int = CROP_MARGIN) -> BrainCrop | None:
    """The normalised crop of a raw (C, D, H, W) case around its brain; None when the brain is empty."""
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W) image, got shape {image.shape}")
    mask = brain_mask(image)
    if not mask.any():
        return None
    box = bounding_box(mask, margin)
    return BrainCrop(box, normalise(image[(slice(None), *box)], mask[box]), mask[box])
