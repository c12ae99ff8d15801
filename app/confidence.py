"""Per-case confidence from the ensemble's own probabilities: how far to trust a segmentation.

For each BraTS region the fold-averaged probabilities give an *expected Dice* of the predicted mask: if the
probabilities were calibrated, a voxel of probability p is tumour with chance p, so the mask's expected
overlap is the soft Dice 2 * sum_{mask} p / (sum p + |mask|). It falls when many voxels sit near 0.5 (the
folds disagree or each is unsure) and when much probability lies outside the mask. An empty mask scores the
chance that the region is truly absent, 1 - (expected volume) / `EMPTY_REGION_VOXELS`, not the soft Dice,
which is 0 as soon as any voxel is doubtful: post-processing step 3 empties ET on purpose when fewer than
that many voxels are called, and a few hundred voxels at p = 0.2 do not make an absent ET wrong. The case's
confidence is the mean over WT, TC and ET; below `LOW_CONFIDENCE` the per-case line and the report carry a
warning. The threshold is calibrated on the out-of-distribution sweep by `benchmarks/calibrate_confidence.py`
(README, Confidence): it is the value that best separates cases whose mean Dice is below 0.7 from the others.
The same warning fires where the ensemble is sure and the labels are implausible: most of the edema far from
the core (`far_edema_share`), as where grey matter is called edema. The expected Dice judges the labels the
case is given: the probability of a blob post-processing removed (`dismissed_blobs`) does not count against
them where the ensemble is sure of a tumour that stayed.
"""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage

from .case_warnings import CaseWarning, WarningCode
from .conventions import EDEMA, ENHANCING, NECROSIS, core_mask
from .fusion import TaskProbabilities, fusion_region
from .postprocess import CONNECTIVITY, holds_sure_component
from .preprocess import bounding_box

# Below this mean expected Dice a case is flagged for review (calibrated: see the module docstring).
LOW_CONFIDENCE = 0.69
LOW_CONFIDENCE_WARNING = CaseWarning(WarningCode.LOW_CONFIDENCE, "low confidence: review this segmentation")
# Post-processing draws cores the network did not (step 2's dark edema, step 4's enclosed centre), and the
# network gave those voxels little core probability, so TC's expected Dice is near 0 whether the drawn core is
# right or wrong: on 19 tumours without enhancement the warning fired on all 9 good ones as on 8 of the 10
# poor (README, Confidence). A flagged case whose final core is mostly drawn says so, so that the reader knows
# what to look at.
DRAWN_CORE_SHARE = 0.5
DRAWN_CORE_WARNING = CaseWarning(WarningCode.DRAWN_CORE, "tumour core mostly drawn by post-processing, which the "
                                 "confidence cannot judge: review the core")
# The ensemble can be wrong and sure: where grey matter is bright on FLAIR and T2 it calls the cortex edema with
# every fold agreeing (issue 13's independent phantoms; the signal-equation phantoms of
# benchmarks/signal_phantoms.py), and the expected Dice stays high. Such edema lies far from the tumour's core,
# where a tumour's own edema rarely does, so a case whose edema is mostly that far is flagged too (README,
# Confidence: on 64 tuning cases it flagged 4, all poor, and none of the others; on 128 held-out cases 5, 3 of
# them poor, one of which the expected Dice had missed).
FAR_EDEMA_MM = 25.0
FAR_EDEMA_SHARE = 0.5
FAR_EDEMA_WARNING = ("most of the edema lies over {mm:.0f} mm from the core ({share:.0%}), as where grey matter is "
                     "taken for edema: review the whole tumour")
# Probabilities under this floor are ignored: thousands of voxels at p = 0.01 far from any tumour would
# otherwise weigh as much as a real doubt at the border.
_FLOOR = 0.1
# An empty mask is as likely wrong as the expected volume outside it is large against this: 0.3 ml, the
# smallest ET post-processing kept until step 3's enhancement check let it keep smaller enhancing ones; kept
# at 300 so that the calibrated LOW_CONFIDENCE keeps its meaning.
EMPTY_REGION_VOXELS = 300


def expected_dice(p: TaskProbabilities, labels: np.ndarray, region: np.ndarray | None = None) -> dict[str, float]:
    """Expected Dice of WT, TC and ET for internal ``labels`` (0/1/2/3) on the probabilities' crop.

    Region probabilities are read as the fusion reads them: task 2 (whole tumour, core) only inside the
    fusion ``region``, the dilated coarse tumour of task 1 (default: computed here; outside it task 2
    never decides anything, and it was never trained far from tumours), task 3 for ET within the core."""
    inside = fusion_region(p) if region is None else region
    core = (p.classes[NECROSIS] + p.classes[ENHANCING]) * inside
    regions = {
        "WT": (core + p.classes[EDEMA] * inside, labels > 0),
        "TC": (core, core_mask(labels)),
        "ET": (core * p.enhancing, labels == ENHANCING),
    }
    return {name: _soft_dice(prob, mask) for name, (prob, mask) in regions.items()}


def dismissed_blobs(p: TaskProbabilities, fused: np.ndarray, final: np.ndarray,
                    region: np.ndarray | None = None) -> np.ndarray:
    """The voxels whose probability the expected Dice should not count: every blob of whole-tumour
    probability (over the floor, inside the fusion ``region``) that holds tumour post-processing removed
    (steps 1 and 5: ``fused`` labels the ``final`` ones lack) and none of the final tumour; nothing unless a
    final component vouches for itself as the tumour as step 5 reads it (mean task-1 probability at least
    even odds, and a core: `holds_sure_component`).

    Why: step 5 removes a component because its mean tumour probability is under even odds, and the expected
    Dice then read that same doubt as tumour the mask missed, so the cases the step mended stayed flagged with
    lower confidence than before (README, Confidence). Where no kept component is sure, or what is kept is
    edema without a core (the out-of-distribution sweep's thicker cortex: a false component kept, the tumour
    removed), the removed one may be the tumour, and its probability still counts."""
    removed = (fused > 0) & (final == 0)
    if not removed.any() or not holds_sure_component(final, p.tumour):
        return np.zeros(final.shape, bool)
    inside = fusion_region(p) if region is None else region
    probable = inside & ((p.classes[NECROSIS] + p.classes[ENHANCING] + p.classes[EDEMA]) >= _FLOOR)
    blobs = cc3d.connected_components(probable | removed, connectivity=CONNECTIVITY)
    dismissed = np.setdiff1d(np.unique(blobs[removed]), np.unique(blobs[final > 0]))
    return np.isin(blobs, dismissed)


def _soft_dice(probability: np.ndarray, mask: np.ndarray) -> float:
    weights = np.where(probability >= _FLOOR, probability, 0.0)
    expected_volume = float(weights.sum())
    if not mask.any():  # the chance that the region is truly absent
        return max(0.0, 1.0 - expected_volume / EMPTY_REGION_VOXELS)
    return 2.0 * float(weights[mask].sum()) / (expected_volume + float(mask.sum()))


def case_confidence(expected: dict[str, float]) -> float:
    return float(np.mean(list(expected.values())))


def drawn_core_share(fused: np.ndarray, final: np.ndarray) -> float:
    """The share of the ``final`` labels' core (NCR/NET or ET) that the ``fused`` labels, the network's own
    before post-processing, did not call core (internal labels, same shape); 0 without a core."""
    core = core_mask(final)
    size = int(core.sum())
    if size == 0:
        return 0.0
    drawn = core & ~core_mask(fused)
    return int(drawn.sum()) / size


def far_edema_share(labels: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> float:
    """The share of the edema in internal ``labels`` farther than `FAR_EDEMA_MM` from every core voxel
    (NCR/NET or ET); ``spacing`` in mm along the array's axes. 1 for edema without a core, 0 without edema."""
    edema = labels == EDEMA
    if not edema.any():
        return 0.0
    core = core_mask(labels)
    if not core.any():
        return 1.0
    # Every core and edema voxel lies in the tumour's box, so the distances computed there are exact.
    box = bounding_box(labels > 0)
    distance = ndimage.distance_transform_edt(~core[box], sampling=spacing)
    return float((distance[edema[box]] > FAR_EDEMA_MM).mean())


def confidence_warnings(confidence: float | None, drawn_share: float = 0.0,
                        far_share: float = 0.0) -> list[CaseWarning]:
    """The warnings a case earns: `LOW_CONFIDENCE_WARNING` when its confidence is under `LOW_CONFIDENCE` or
    over `FAR_EDEMA_SHARE` of its edema lies far from the core (`far_edema_share`), followed by the reason
    that second test gives (`FAR_EDEMA_WARNING`) and by `DRAWN_CORE_WARNING` when the confidence is low and
    over `DRAWN_CORE_SHARE` of the core was drawn by post-processing (`drawn_core_share`); none otherwise."""
    doubted = confidence is not None and confidence < LOW_CONFIDENCE
    far = far_share > FAR_EDEMA_SHARE
    if not (doubted or far):
        return []
    return ([LOW_CONFIDENCE_WARNING]
            + ([CaseWarning(WarningCode.FAR_EDEMA, FAR_EDEMA_WARNING.format(mm=FAR_EDEMA_MM, share=far_share))]
               if far else [])
            + ([DRAWN_CORE_WARNING] if doubted and drawn_share > DRAWN_CORE_SHARE else []))
