"""One-pass ensemble inference: preprocessing, tiling, fold averaging and the fusion of the three tasks.

Every fold model runs once per tile of its grid; each single forward pass yields all three tasks'
probabilities. Probabilities are averaged per task over the folds, then fused once (SPEC "Inference").
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .conventions import EDEMA, ENHANCING, NECROSIS
from .model import CORE_CLASSES, TUMOUR_CLASSES, task_outputs

# Every spatial size must be divisible by 8 (three 2x poolings).
DIVISOR = 8
PAPER_TILE = (16, 32, 32)
PAPER_KEEP = (5, 20, 20)
# Fast tiling's default: 24x48x48 tiles that discard 2 voxels at each side where tiles meet, instead of the
# paper's 11x12x12 (1.43x redundancy instead of 8.19x). On the shipped ensemble they agree with the paper
# tiling as closely as training-patch-sized 16x32x32 tiles do and run 1.25x faster (README, Speed). Much
# larger tiles (e.g. 160x192x192, a whole brain) are faster still, but networks trained on 16x32x32 patches
# change their answers with that much more context; `--tile` and `--tile-margin` choose.
FAST_TILE = (24, 48, 48)
FAST_MARGIN = 2
CROP_MARGIN = 4  # voxels of background kept around the brain's bounding box
# Fusion step 2 (SPEC): the coarse whole tumour is dilated by this many voxels.
FUSION_DILATION = 5


class Tiling(str, Enum):
    FAST = "fast"
    PAPER = "paper"


class Mirroring(str, Enum):
    """Test-time mirroring. NONE: each fold sees the case as it is. FOLDS: fold k sees it mirrored by the
    k-th of the eight axis combinations (no extra cost: the ensemble averages over mirrors as it averages
    over grid shifts). FULL: every fold sees all eight (nnU-Net's test-time mirroring, 8x the network time)."""

    NONE = "none"
    FOLDS = "folds"
    FULL = "full"


# The eight mirror images of a volume: subsets of the spatial axes (2, 3, 4 of a (B, C, D, H, W) batch).
MIRRORS = ((), (4,), (3,), (3, 4), (2,), (2, 4), (2, 3), (2, 3, 4))


class Precision(str, Enum):
    """Network arithmetic. AUTO is bf16 where the device computes it natively, else fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class TaskProbabilities:
    """Fold-averaged probabilities over a crop: task 1 tumour, task 2 five classes, task 3 ET."""

    tumour: np.ndarray  # (D, H, W): task 1's P1+P2+P3
    classes: np.ndarray  # (5, D, H, W): task 2
    enhancing: np.ndarray  # (D, H, W): task 3's P(ET)


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels inside the skull-stripped brain: nonzero in any modality."""
    return np.any(image != 0, axis=0)


def normalise(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score each modality inside the brain; outside-brain voxels stay 0 (SPEC "Input")."""
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in {"cpu", "cuda"}:
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 convolutions run natively here: CUDA GPUs that support bf16, CPUs with AVX512-BF16 or
    AMX (on others oneDNN emulates bf16, which is slower than fp32)."""
    if device.type == "cuda":  # emulated bf16 (pre-Ampere GPUs) is slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = torch.cpu
    has = [getattr(cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.backends.mkldnn.is_available() and any(check() for check in has)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The arithmetic a ``precision`` option means on ``device``: FP32 or BF16, never AUTO."""
    try:
        chosen = Precision(precision)
    except ValueError:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}") from None
    if chosen is Precision.AUTO:
        chosen = Precision.BF16 if native_bf16(device) else Precision.FP32
    return chosen


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm that follows a (transposed) conv folded into it.

    Inference then skips a memory-bound pass per layer; outputs are equal up to float rounding.
    """
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) and isinstance(bn, nn.BatchNorm3d):
                module[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose3d))
                module[i + 1] = nn.Identity()
    return model


# ----------------------------------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class Tile:
    """A network input window and the part of its output that is kept.

    ``source`` is in volume coordinates and may reach outside the volume, where the input is zero (the
    background value after normalisation); ``keep`` is in volume coordinates, ``keep_in_tile`` is the same
    voxels relative to the tile.
    """

    source: tuple[slice, ...]
    keep: tuple[slice, ...]
    keep_in_tile: tuple[slice, ...]


def _axis_windows(length: int, tile: int, keep: int, shift: int = 0) -> list[tuple[int, int, int]]:
    """(tile_start, keep_start, keep_stop) along one axis: kept windows of ``keep`` voxels laid from
    ``-shift`` on, clipped to [0, length), which they cover."""
    margin = (tile - keep) // 2
    windows = []
    start = -shift
    while True:
        keep_stop = min(start + keep, length)
        windows.append((start - margin, max(start, 0), keep_stop))
        if keep_stop >= length:
            return windows
        start += keep


def plan_tiles(shape: Sequence[int], tile: Sequence[int], keep: Sequence[int],
               shift: Sequence[int] = (0, 0, 0)) -> list[Tile]:
    """Tiles of size ``tile`` whose centred ``keep`` windows partition a volume of ``shape``.

    The grid of kept windows starts ``shift`` voxels before the volume (0 = at its first voxel). An odd
    margin (the paper's 16 -> 5) puts the extra voxel after the kept window.
    """
    for t, k in zip(tile, keep):
        if t % DIVISOR or k < 1 or k > t:
            raise ValueError(f"tile {tuple(tile)} / keep {tuple(keep)}: tiles must be multiples of {DIVISOR} "
                             "and hold their kept centre")
    if any(s < 0 or s >= k for s, k in zip(shift, keep)):
        raise ValueError(f"grid shift {tuple(shift)} must lie in [0, keep {tuple(keep)})")
    per_axis = [_axis_windows(n, t, k, s) for n, t, k, s in zip(shape, tile, keep, shift)]
    tiles = []
    for combo in itertools.product(*per_axis):
        source = tuple(slice(s, s + t) for (s, _, _), t in zip(combo, tile))
        keep_out = tuple(slice(a, b) for _, a, b in combo)
        keep_in = tuple(slice(a - s, b - s) for s, a, b in combo)
        tiles.append(Tile(source, keep_out, keep_in))
    return tiles


def fast_tiles(shape: Sequence[int], max_tile: Sequence[int], margin: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tile and keep sizes for the fast tiling: as few large tiles as cover the crop.

    Where one tile spans an axis it needs no discarded margin: beyond the crop lies background, which the
    zero padding reproduces exactly. Where several tiles split an axis, each discards ``margin`` voxels at
    its sides so every kept voxel sees at least that much real context across tile seams.
    """
    tile, keep = [], []
    for n, t_max in zip(shape, max_tile):
        if _round_up(n, DIVISOR) <= t_max:
            tile.append(_round_up(n, DIVISOR))
            keep.append(n)
            continue
        count = -(-n // (t_max - 2 * margin))
        k = -(-n // count)
        t = _round_up(k + 2 * margin, DIVISOR)
        tile.append(t)
        keep.append(t - 2 * margin)
    return tuple(tile), tuple(keep)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _offset(window: tuple[slice, ...], by: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(w.start + b, w.stop + b) for w, b in zip(window, by))


# -------------------------------------------------------------------------------------------- predictor


class EnsemblePredictor:
    """Runs K fold models on a case: one pass per tile per model, probabilities averaged per task.

    With the fast tiling each fold has its own tile grid, shifted by a few voxels (`grid_shift`);
    ``shift_folds=False`` gives every fold fold 0's grid. The constructor takes the knobs; `load_models`
    (or the CLI's weight loader) supplies the networks; `predict_probabilities` and `predict_labels` do the
    work.
    """

    def __init__(self, device: str = "auto", tiling: str = "fast", max_tile: Sequence[int] = FAST_TILE,
                 margin: int = FAST_MARGIN, precision: str = "auto", crop_margin: int = CROP_MARGIN,
                 shift_folds: bool = True, tta: str = "none"):
        self.device = resolve_device(device)
        try:
            self.tiling = Tiling(tiling)
        except ValueError:
            raise ValueError(f"tiling must be fast or paper, got {tiling!r}") from None
        if any(t % DIVISOR or t < DIVISOR for t in max_tile):
            raise ValueError(f"max_tile {tuple(max_tile)} must be positive multiples of {DIVISOR}")
        if margin < 0 or any(t <= 2 * margin for t in max_tile):
            raise ValueError(f"margin {margin} must be >= 0 and leave part of each tile")
        self.max_tile, self.margin, self.crop_margin = tuple(max_tile), margin, crop_margin
        self.shift_folds = shift_folds
        try:
            self.tta = Mirroring(tta)
        except ValueError:
            raise ValueError(f"tta must be one of {[m.value for m in Mirroring]}, got {tta!r}") from None
        self.precision = resolve_precision(precision, self.device)
        self.models: list[nn.Module] = []
        self.timings: dict[str, float] = {}

    def load_models(self, models: Sequence[nn.Module]) -> EnsemblePredictor:
        if not models:
            raise ValueError("at least one model is needed")
        # Channels-last suits both cuDNN and oneDNN: on a 2-core AVX-512 CPU the network runs 1.7x faster
        # with identical labels (benchmarks/benchmark.py), so it is the layout on every device.
        self.models = [fold_batchnorm(m).to(self.device, memory_format=torch.channels_last_3d) for m in models]
        return self

    def grid_shift(self, fold_index: int) -> tuple[int, int, int]:
        """Where the ``fold_index``-th model's tile grid starts, in voxels before the crop, along each axis.

        The three 2x poolings make a tile's output depend on each voxel's position modulo 8 in the tile.
        In the fast tiling, fold k's grid starts k mod 8 voxels earlier than fold 0's, so the ensemble
        averages that dependence out instead of repeating one phase ten times: on the shipped ensemble the
        masks agree more closely with the paper tiling and with the truth (README, Speed). A shifted grid
        costs an extra row of tiles only where the brain box leaves less than the shift spare in the last
        row. The paper tiling is the reference and keeps one grid.
        """
        if self.tiling is Tiling.PAPER or not self.shift_folds:
            return (0, 0, 0)
        return (fold_index % DIVISOR,) * 3

    def mirrors(self, fold_index: int) -> tuple[tuple[int, ...], ...]:
        """The axis flips the ``fold_index``-th model's tiles are run under (outputs flipped back, averaged)."""
        if self.tta is Mirroring.FULL:
            return MIRRORS
        if self.tta is Mirroring.FOLDS:
            return (MIRRORS[fold_index % len(MIRRORS)],)
        return ((),)

    def plan(self, shape: Sequence[int], fold_index: int = 0, region: tuple[slice, ...] | None = None) -> list[Tile]:
        """The tiles the ``fold_index``-th model runs on over a crop of ``shape``; their kept windows cover
        ``region`` of the crop (default: all of it), and they read whatever lies around it as context."""
        region = tuple(slice(0, n) for n in shape) if region is None else region
        inner = [r.stop - r.start for r in region]
        shift = self.grid_shift(fold_index)
        if self.tiling is Tiling.PAPER:
            tile, keep = PAPER_TILE, PAPER_KEEP
        else:
            tile, keep = fast_tiles([n + s for n, s in zip(inner, shift)], self.max_tile, self.margin)
            shift = tuple(s % k for s, k in zip(shift, keep))  # tiny kept windows (8-voxel tiles) wrap
        starts = [r.start for r in region]
        return [Tile(_offset(t.source, starts), _offset(t.keep, starts), t.keep_in_tile)
                for t in plan_tiles(inner, tile, keep, shift)]

    def segmented_region(self, brain: np.ndarray) -> tuple[slice, ...] | None:
        """What the kept windows must cover in a crop whose brain mask is ``brain``: the fast tiling covers
        the brain's bounding box and reads the background ring around it (``crop_margin`` voxels) as
        context only, since labels outside the brain are background anyway. Covering 8 fewer voxels per
        axis also lets the shifted fold grids fit without an extra row of tiles. The paper tiling, the
        reference, covers the whole crop as it always has. None = the whole crop."""
        if self.tiling is Tiling.PAPER or not brain.any():
            return None
        return bounding_box(brain)

    def _autocast(self):
        if self.precision is Precision.FP32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.inference_mode()
    def predict_probabilities(self, image: np.ndarray, progress: Callable[[int, int], None] | None = None,
                              region: tuple[slice, ...] | None = None) -> TaskProbabilities:
        """Fold-averaged task probabilities for a normalised (4, D, H, W) crop, computed over ``region`` of
        it (default: all of it; elsewhere every probability is 0)."""
        if not self.models:
            raise RuntimeError("no models loaded: call load_models first")
        shape = image.shape[1:]
        plans = [self.plan(shape, k, region) for k in range(len(self.models))]
        # One zero-padded copy of the crop on the device serves every fold's tiles.
        before = [max(0, -min(t.source[a].start for p in plans for t in p)) for a in range(3)]
        after = [max(0, max(t.source[a].stop for p in plans for t in p) - n) for a, n in enumerate(shape)]
        padded = torch.from_numpy(np.pad(image, [(0, 0)] + list(zip(before, after)))).to(self.device)
        sums = [torch.zeros(shape, device=self.device), torch.zeros((5, *shape), device=self.device),
                torch.zeros(shape, device=self.device)]
        done, total = 0, sum(len(p) for p in plans)
        for index, (model, tiles) in enumerate(zip(self.models, plans)):
            tile_voxels = int(np.prod([s.stop - s.start for s in tiles[0].source]))
            batch = max(1, min(64, self._batch_voxels() // tile_voxels))
            mirrors = self.mirrors(index)
            for start in range(0, len(tiles), batch):
                group = tiles[start:start + batch]
                x = torch.stack([padded[(slice(None), *_offset(t.source, before))] for t in group])
                tumour, classes, enhancing = self._mirrored_forward(model, x, mirrors)
                for i, t in enumerate(group):
                    sums[0][t.keep] += tumour[i][t.keep_in_tile]
                    sums[1][(slice(None), *t.keep)] += classes[i][(slice(None), *t.keep_in_tile)]
                    sums[2][t.keep] += enhancing[i][t.keep_in_tile]
                done += len(group)
                if progress is not None:
                    progress(done, total)
        k = len(self.models)
        return TaskProbabilities(*((s / k).cpu().numpy() for s in sums))

    def _batch_voxels(self) -> int:
        """Input voxels per forward pass: ~2M keeps a GPU busy; on a CPU, ~0.5M runs 1.3-1.4x faster per voxel
        than 2M (the activations stay nearer the caches; benchmarks/benchmark.py, 2-core AVX-512 CPU)."""
        return 1 << 21 if self.device.type == "cuda" else 1 << 19

    def _mirrored_forward(self, model: nn.Module, x: torch.Tensor, mirrors: Sequence[tuple[int, ...]]):
        """`_forward` averaged over the mirror images ``mirrors`` of the tiles, each flipped back."""
        outputs = None
        for axes in mirrors:
            flipped = x.flip(axes) if axes else x
            tumour, classes, enhancing = self._forward(model, flipped.contiguous(memory_format=torch.channels_last_3d))
            if axes:
                scalar_axes = tuple(a - 1 for a in axes)  # outputs without a channel axis
                tumour, classes, enhancing = tumour.flip(scalar_axes), classes.flip(axes), enhancing.flip(scalar_axes)
            current = (tumour, classes, enhancing)
            outputs = current if outputs is None else tuple(o + c for o, c in zip(outputs, current))
        if len(mirrors) > 1:
            outputs = tuple(o / len(mirrors) for o in outputs)
        return outputs

    def _forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One model's (task-1 tumour prob, task-2 class probs, task-3 ET prob) for a batch of tiles."""
        with self._autocast():
            logits = task_outputs(model, x)
        tumour = torch.softmax(logits[0].float(), dim=1)[:, list(TUMOUR_CLASSES)].sum(dim=1)
        return tumour, torch.softmax(logits[1].float(), dim=1), torch.softmax(logits[2].float(), dim=1)[:, 1]

    def predict_labels(self, image: np.ndarray, progress: Callable[[int, int], None] | None = None,
                       return_probabilities: bool = False):
        """Internal label map (0/1/2/3) for a raw (4, D, H, W) case: normalise, crop to the brain, run the
        ensemble, fuse. With ``return_probabilities`` also returns (crop box, TaskProbabilities).
        Seconds spent per stage are left in ``self.timings``."""
        clock = time.perf_counter()
        mask = brain_mask(image)
        labels = np.zeros(image.shape[1:], np.uint8)
        if not mask.any():
            return (labels, None, None) if return_probabilities else labels
        box = bounding_box(mask, self.crop_margin)
        normalised = normalise(image[(slice(None), *box)], mask[box])
        self.timings = {"preprocess": time.perf_counter() - clock}
        clock = time.perf_counter()
        probabilities = self.predict_probabilities(normalised, progress, self.segmented_region(mask[box]))
        self.timings["network"] = time.perf_counter() - clock
        clock = time.perf_counter()
        labels[box] = fuse(probabilities) * mask[box]
        self.timings["fusion"] = time.perf_counter() - clock
        return (labels, box, probabilities) if return_probabilities else labels


# --------------------------------------------------------------------------------------------------- fusion


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


def fuse(p: TaskProbabilities) -> np.ndarray:
    """SPEC fusion: task 1 finds the coarse whole tumour, task 2 labels inside its 5-voxel dilation,
    task 3 splits the predicted core into ET and NCR/NET. Returns internal labels 0/1/2/3."""
    region = fusion_region(p)
    task2 = np.argmax(p.classes, axis=0)
    labels = np.zeros(region.shape, np.uint8)
    labels[region & (task2 == EDEMA)] = EDEMA
    core = region & np.isin(task2, CORE_CLASSES)
    labels[core] = np.where(p.enhancing[core] > 0.5, ENHANCING, NECROSIS)
    return labels

