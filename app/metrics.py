"""BraTS region metrics: Dice, HD95 (mm), sensitivity, specificity, PPV for WT, TC and ET, and the lesion-wise
Dice and HD95 that BraTS ranks by since 2023.

Empty-mask rules follow the legacy BraTS evaluation: both empty -> Dice 1, HD95 0; exactly one empty ->
Dice 0, HD95 373.13 (the diagonal of the 240x240x155 mm volume). The lesion-wise scores follow BraTS 2023's
rules (`lesion_scores`), with their penalty of 374 mm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

from .conventions import DEFAULT_LESION_CHALLENGE, ENHANCING, LESION_RULES, LesionRule, core_mask
from .preprocess import bounding_box

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


# ------------------------------------------------------------------------------------ lesion-wise (BraTS 2023+)


LESION_PENALTY_HD95 = 374.0  # a missed lesion's or a false positive's HD95 (BraTS 2023's value)
_CHALLENGE_IN_ID = re.compile(r"^BraTS-([A-Z]{3})-", re.IGNORECASE)
_DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)


def lesion_challenge(case_id: str) -> str:
    """The challenge whose lesion rule scores a case: the one its BraTS 2023+ ID names, else GLI."""
    match = _CHALLENGE_IN_ID.match(case_id)
    name = match.group(1).upper() if match else DEFAULT_LESION_CHALLENGE
    return name if name in LESION_RULES else DEFAULT_LESION_CHALLENGE


@dataclass
class LesionScores:
    """A region's lesion-wise scores: the mean over its lesions (above the rule's volume) and its false-positive
    components, each false positive and missed lesion scoring Dice 0 and HD95 374; both 1 and 0 when there
    is neither. ``tp``/``fn``: lesions found or missed (above the volume), ``fp``: predicted components that
    touch no lesion."""

    dice: float
    hd95: float
    tp: int
    fn: int
    fp: int


def _padded_box(box: tuple[slice, ...], pad: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape))


def _joint_box(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))


def _lesions(truth: np.ndarray, dilation: int) -> np.ndarray:
    """The truth's lesions, numbered: its voxels grouped by the 26-connected components of the truth dilated
    ``dilation`` times (so lesions closer than that are one lesion)."""
    box = bounding_box(truth, dilation)
    dilated = ndimage.binary_dilation(truth[box], _DILATION_STRUCTURE, iterations=dilation)
    lesions = np.zeros(truth.shape, np.uint32)
    lesions[box] = cc3d.connected_components(dilated, connectivity=26) * truth[box]
    return lesions


def lesion_scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                  rule: LesionRule = LESION_RULES[DEFAULT_LESION_CHALLENGE]) -> LesionScores:
    """BraTS 2023's lesion-wise Dice and HD95 of one region's masks (``spacing`` in array order z, y, x).

    A lesion is matched by every predicted 26-connected component that reaches into it dilated ``rule.dilation``
    times; its Dice and HD95 are taken against their union. Components matching no lesion are false
    positives. Lesions of at most ``rule.max_ignored_mm3`` are left out of the mean (their matches are no false
    positives). HD95 is this module's (surface voxels), not the surfel-weighted one of BraTS's script."""
    components = cc3d.connected_components(pred, connectivity=26)
    component_boxes = ndimage.find_objects(components)
    matched: set[int] = set()
    dice_sum = hd95_sum = 0.0
    tp = fn = 0
    if truth.any():
        lesions = _lesions(truth, rule.dilation)
        voxel_mm3 = float(np.prod(spacing))
        for number, box in enumerate(ndimage.find_objects(lesions), start=1):
            if box is None:
                continue
            reach = _padded_box(box, rule.dilation, truth.shape)
            lesion_near = lesions[reach] == number
            touched = np.unique(components[reach][ndimage.binary_dilation(lesion_near, _DILATION_STRUCTURE,
                                                                          iterations=rule.dilation)])
            touched = [int(c) for c in touched if c]
            matched.update(touched)
            if lesion_near.sum() * voxel_mm3 <= rule.max_ignored_mm3:
                continue
            if not touched:
                fn += 1
                hd95_sum += LESION_PENALTY_HD95
                continue
            tp += 1
            joint = _joint_box([box, *(component_boxes[c - 1] for c in touched)])
            found = np.isin(components[joint], touched)
            lesion = lesions[joint] == number
            dice_sum += dice(found, lesion)
            hd95_sum += hd95(found, lesion, spacing)
    fp = sum(1 for c in range(1, len(component_boxes) + 1) if c not in matched)
    scored = tp + fn + fp
    if scored == 0:
        return LesionScores(1.0, 0.0, 0, 0, 0)
    return LesionScores(dice_sum / scored, (hd95_sum + fp * LESION_PENALTY_HD95) / scored, tp, fn, fp)


def case_lesion_scores(pred_labels: np.ndarray, truth_labels: np.ndarray, spacing=(1.0, 1.0, 1.0),
                       rule: LesionRule = LESION_RULES[DEFAULT_LESION_CHALLENGE]) -> dict[str, LesionScores]:
    """`lesion_scores` per region for internal label maps (array order z, y, x; spacing in the same order)."""
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground truth {truth_labels.shape}")
    pred, truth = region_masks(pred_labels), region_masks(truth_labels)
    return {r: lesion_scores(pred[r], truth[r], spacing, rule) for r in REGIONS}
