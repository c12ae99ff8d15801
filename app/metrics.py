"""BraTS region metrics: Dice, HD95 (mm), sensitivity, specificity, PPV for WT, TC and ET.

Empty-mask rules follow the legacy BraTS evaluation: both empty -> Dice 1, HD95 0; exactly one empty ->
Dice 0, HD95 373.13 (the diagonal of the 240x240x155 mm volume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .conventions import ENHANCING, core_mask

REGIONS = ("WT", "TC", "ET")
EMPTY_HD95 = 373.13


def region_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """WT/TC/ET masks of an internal label map (0/1/2/3)."""
    return {
        "WT": labels > 0,
        "TC": core_mask(labels),
        "ET": labels == ENHANCING,
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = int(pred.sum()), int(truth.sum())
    if p == 0 and t == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / (p + t)


def region_dice(pred_labels: np.ndarray, truth_labels: np.ndarray) -> dict[str, float]:
    pred, truth = region_masks(pred_labels), region_masks(truth_labels)
    return {r: dice(pred[r], truth[r]) for r in REGIONS}


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> float:
    """95th percentile of the symmetric surface distances in mm (``spacing`` in array order z, y, x)."""
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return EMPTY_HD95
    # Distances only matter around the two masks: work in their joint bounding box (plus one voxel).
    joint = pred | truth
    coords = np.argwhere(joint)
    lo, hi = np.maximum(coords.min(0) - 1, 0), np.minimum(coords.max(0) + 2, joint.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, t = pred[box], truth[box]
    sp, st = _surface(p), _surface(t)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


@dataclass
class RegionScores:
    dice: float
    hd95: float
    sensitivity: float
    specificity: float
    ppv: float


def region_scores(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> RegionScores:
    tp = int(np.logical_and(pred, truth).sum())
    fp = int(np.logical_and(pred, ~truth).sum())
    fn = int(np.logical_and(~pred, truth).sum())
    tn = pred.size - tp - fp - fn
    return RegionScores(
        dice=dice(pred, truth),
        hd95=hd95(pred, truth, spacing),
        sensitivity=tp / (tp + fn) if tp + fn else 1.0,
        specificity=tn / (tn + fp) if tn + fp else 1.0,
        ppv=tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0),
    )


def case_scores(pred_labels: np.ndarray, truth_labels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict[str, RegionScores]:
    """Scores per region for internal label maps (array order z, y, x; spacing in the same order)."""
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground truth {truth_labels.shape}")
    pred, truth = region_masks(pred_labels), region_masks(truth_labels)
    return {r: region_scores(pred[r], truth[r], spacing) for r in REGIONS}
