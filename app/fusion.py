"""OM-Net's three task outputs: from logits to probabilities, and the fusion into one label map.

Task 1 finds the coarse whole tumour; task 2 labels edema / core inside its dilation; task 3 splits the
core into enhancing and non-enhancing (docs/ALGORITHM.md, Fusion). The fusion runs with numpy on the CPU
and with torch on the prediction device (a GPU need not send the probabilities to the host and wait for
the CPU); both give identical labels (tests/test_fusion_postprocess.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .conventions import EDEMA, ENHANCING, NECROSIS
from .model import CORE_CLASSES, TUMOUR_CLASSES, task_outputs
from .options import Fusion
from .preprocess import bounding_box

# Fusion step 2: the coarse whole tumour is dilated by this many voxels (a Euclidean ball).
FUSION_DILATION = 5


@dataclass(frozen=True)
class FusionThresholds:
    """The region fusion's decision thresholds (`Fusion.REGIONS`; the argmax rule reads only
    ``enhancing``). The defaults are the even odds of each decision; `benchmarks/fusion_grid.py` measures
    others on cases with ground truth."""

    tumour: float = 0.5  # task 2's P(NCR/NET) + P(edema) + P(ET) above this: tumour
    core: float = 0.5  # core where P(NCR/NET) + P(ET) exceeds this share of the tumour probability
    enhancing: float = 0.5  # task 3's P(ET) above this, inside the core: ET

    def __post_init__(self):
        for name in ("tumour", "core", "enhancing"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"fusion threshold {name} must be in (0, 1), got {value}")


@dataclass
class TaskProbabilities:
    """Fold-averaged probabilities over a crop: task 1 tumour, task 2 five classes, task 3 ET (numpy
    arrays, or device tensors before they reach the host)."""

    tumour: np.ndarray  # (D, H, W): task 1's P1+P2+P3
    classes: np.ndarray  # (5, D, H, W): task 2
    enhancing: np.ndarray  # (D, H, W): task 3's P(ET)

    def to_numpy(self) -> TaskProbabilities:
        return TaskProbabilities(*(to_host(a) for a in (self.tumour, self.classes, self.enhancing)))


def to_host(array) -> np.ndarray:
    """A numpy array on the host from a numpy array or a tensor on any device."""
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else array


def omnet_probabilities(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One model's (task-1 tumour probability, task-2 class probabilities, task-3 ET probability) for a batch
    of tiles: the per-output reduction the tiled ensemble averages over folds."""
    logits = task_outputs(model, x)
    tumour = torch.softmax(logits[0].float(), dim=1)[:, list(TUMOUR_CLASSES)].sum(dim=1)
    return tumour, torch.softmax(logits[1].float(), dim=1), torch.softmax(logits[2].float(), dim=1)[:, 1]


# ------------------------------------------------------------------------------------------------ numpy


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate by a Euclidean ball of ``radius`` voxels, computed only around the mask for speed."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    box = bounding_box(mask, radius)
    out = np.zeros_like(mask)
    out[box] = ndimage.distance_transform_edt(~mask[box]) <= radius
    return out


def fusion_region(p: TaskProbabilities) -> np.ndarray:
    """Where task 2 decides: task 1's coarse whole tumour (tumour probability wins over non-tumour; they
    sum to 1), dilated by FUSION_DILATION voxels."""
    return dilate(p.tumour > 0.5, FUSION_DILATION)


def task2_masks(classes: np.ndarray | torch.Tensor, rule: Fusion, thresholds: FusionThresholds = FusionThresholds()):
    """(tumour, core) masks from task 2's (5, ...) class probabilities, numpy arrays or tensors alike."""
    if rule is Fusion.PAPER:
        winner = classes.argmax(0)
        return _one_of(winner, TUMOUR_CLASSES), _one_of(winner, CORE_CLASSES)
    tumour_p = sum(classes[c] for c in TUMOUR_CLASSES)
    core_p = sum(classes[c] for c in CORE_CLASSES)
    tumour = tumour_p > thresholds.tumour
    # At the default share 0.5: core more likely than edema, the tumour's other class.
    return tumour, tumour & (core_p > thresholds.core * tumour_p)


def _one_of(winner, classes: tuple[int, ...]):
    """Where ``winner`` (an array or tensor of class indices) is any of ``classes``."""
    mask = winner == classes[0]
    for c in classes[1:]:
        mask = mask | (winner == c)
    return mask


def fuse(p: TaskProbabilities, region: np.ndarray | None = None, rule: Fusion = Fusion.REGIONS,
         thresholds: FusionThresholds = FusionThresholds()) -> np.ndarray:
    """Internal labels 0/1/2/3: task 2 labels inside ``region`` (default `fusion_region`) by ``rule``, task
    3 splits the predicted core into ET and NCR/NET."""
    region = fusion_region(p) if region is None else region
    tumour, core = task2_masks(p.classes, rule, thresholds)
    labels = np.zeros(region.shape, np.uint8)
    labels[region & tumour] = EDEMA
    core = region & core
    labels[core] = np.where(p.enhancing[core] > thresholds.enhancing, ENHANCING, NECROSIS)
    return labels


# ------------------------------------------------------------------------------------------------ torch


@lru_cache(maxsize=4)
def _ball(radius: int) -> torch.Tensor:
    """The Euclidean ball of ``radius`` as a (1, 1, k, k, k) convolution kernel of ones."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    squared = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    return (squared <= radius * radius).float()[None, None]


def dilate_tensor(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """`dilate` on the mask's device: a voxel is in the dilation when the ball around it meets the mask.

    The convolution sums 0/1 values with a 0/1 kernel, which fp32 (and TF32) represent exactly."""
    if radius <= 0:
        return mask.clone()
    kernel = _ball(radius).to(mask.device)
    hits = torch.nn.functional.conv3d(mask[None, None].float(), kernel, padding=radius)
    return hits[0, 0] > 0.5


def fuse_tensors(p: TaskProbabilities, rule: Fusion = Fusion.REGIONS,
                 thresholds: FusionThresholds = FusionThresholds()) -> tuple[torch.Tensor, torch.Tensor]:
    """`fuse` on the probabilities' device: (internal labels as uint8, the fusion region)."""
    region = dilate_tensor(p.tumour > 0.5, FUSION_DILATION)
    tumour, core = task2_masks(p.classes, rule, thresholds)
    core = region & core
    labels = torch.zeros(region.shape, dtype=torch.uint8, device=region.device)
    labels[region & tumour] = EDEMA
    labels[core] = NECROSIS
    labels[core & (p.enhancing > thresholds.enhancing)] = ENHANCING
    return labels, region
