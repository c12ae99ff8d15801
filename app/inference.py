"""One-pass ensemble inference: K fold models over a case, probabilities averaged per task, fused once.

The pieces live in their own modules, and data flows through them in this order: `app.preprocess` (brain
mask, crop, z-scores), `app.tiling` (which tiles each fold runs on), `app.ensemble` (the model-agnostic
tiled runner: batching, mirroring, accumulation, the out-of-memory retry), `app.fusion` (OM-Net's task
probabilities and their fusion). `EnsemblePredictor` holds the knobs and the models and returns a typed
`CasePrediction`; on a device that runs out of memory even for one tile, the case is run on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .case_warnings import CaseWarning, WarningCode
from .ensemble import MIRRORS, DeviceOutOfMemory, Progress, TiledEnsemble
from .fusion import TaskProbabilities, dilate, fuse, fuse_tensors, fusion_region, omnet_probabilities, to_host
from .options import Device, Fusion, Mirroring, Precision, Tiling, parse_option, parse_scales
from .preprocess import CROP_MARGIN, brain_mask, crop_to_brain, enclosed_in_a_slice, resample
from .tiling import FAST_MARGIN, FAST_TILE, Tile, TilePlanner


def resolve_device(device: str) -> torch.device:
    chosen = parse_option(Device, device, "device")
    if chosen is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if chosen is Device.CUDA and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return torch.device(chosen.value)


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
    chosen = parse_option(Precision, precision, "precision")
    if chosen is Precision.AUTO:
        chosen = Precision.BF16 if native_bf16(device) else Precision.FP32
    return chosen


class _SharedSetting:
    """A process-wide setting that threads may each hold for a while: set on the first entry, restored
    when the last thread leaves (predict's readers run the tumour scout while the device's thread runs the
    ensemble)."""

    def __init__(self) -> None:
        self.lock, self.users, self.before = threading.Lock(), 0, None


_IEEE = _SharedSetting()


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """IEEE fp32 convolutions while inside: cuDNN otherwise runs fp32 convolutions as TF32 (a 10-bit
    mantissa) on Ampere and later GPUs, and `--precision fp32` is the reference arithmetic. A no-op on CPUs."""
    conv = torch.backends.cudnn.conv
    with _IEEE.lock:
        if _IEEE.users == 0:
            _IEEE.before = conv.fp32_precision
            conv.fp32_precision = "ieee"
        _IEEE.users += 1
    try:
        yield
    finally:
        with _IEEE.lock:
            _IEEE.users -= 1
            if _IEEE.users == 0:
                conv.fp32_precision = _IEEE.before


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


def scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, ...]:
    """The spatial shape a crop of ``shape`` has once resampled by ``scale`` (at least one voxel per axis)."""
    return tuple(max(1, round(n * scale)) for n in shape)


def scaled_region(region: tuple[slice, ...] | None, shape: Sequence[int],
                  scaled: Sequence[int]) -> tuple[slice, ...] | None:
    """``region`` of a crop of ``shape`` carried onto the crop resampled to ``scaled``, one voxel wider per
    side (resampling back reads a voxel's neighbours)."""
    if region is None or tuple(shape) == tuple(scaled):
        return region
    factors = [m / n for m, n in zip(scaled, shape)]
    return tuple(slice(max(0, math.floor(s.start * f) - 1), min(m, math.ceil(s.stop * f) + 1))
                 for s, f, m in zip(region, factors, scaled))


def scaled_input(image: torch.Tensor, scale: float) -> torch.Tensor:
    """A normalised (C, D, H, W) crop enlarged (``scale`` > 1) or shrunk by ``scale``. The brain (`brain_mask`)
    is resampled too and everything outside it set to 0, as in a crop the network reads at scale 1."""
    shape = scaled_shape(image.shape[1:], scale)
    if shape == tuple(image.shape[1:]):
        return image
    brain = resample(brain_mask(image).float(), shape) > 0.5
    return (resample(image, shape) * brain).contiguous()


def zero_outside_(volume: torch.Tensor, region: tuple[slice, ...] | None) -> torch.Tensor:
    """``volume`` (spatial axes last) with everything outside ``region`` set to 0 in place (None: nothing)."""
    if region is None:
        return volume
    for axis, window in enumerate(region, start=volume.ndim - len(region)):
        size = volume.shape[axis]
        start, stop, _ = window.indices(size)
        volume.narrow(axis, 0, start).zero_()
        volume.narrow(axis, stop, size - stop).zero_()
    return volume


def _offset_progress(progress: Progress, before: int, total: int, done: int, _pass_total: int) -> None:
    progress(before + done, total)


@dataclass
class CasePrediction:
    """The ensemble's answer for one case before post-processing."""

    labels: np.ndarray  # internal labels 0/1/2/3 over the whole volume, fused, zero outside the brain
    box: tuple[slice, ...] | None  # the brain crop the rest refer to; None for an empty brain
    probabilities: TaskProbabilities | None  # fold-averaged, numpy, over ``box``
    region: np.ndarray | None  # where task 2 decided (the dilated coarse tumour), over ``box``
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    warnings: list[CaseWarning] = field(default_factory=list)

    def tumour_probability(self) -> np.ndarray:
        """Task 1's fold-averaged tumour probability over the whole volume (0 outside the brain crop), for
        post-processing step 5."""
        full = np.zeros(self.labels.shape, np.float32)
        if self.probabilities is not None:
            full[self.box] = self.probabilities.tumour
        return full


CPU_FALLBACK_WARNING = CaseWarning(WarningCode.CPU_FALLBACK, "out of GPU memory even for one tile: this case ran on "
                                   "the CPU")
# The tumour scout (`EnsemblePredictor.scout_tumour`): this many folds (a fifth of the shipped ensemble's
# network time), their task-1 tumour grown by this many voxels (edema's fringe is dim but still not brain).
SCOUT_FOLDS = 2
SCOUT_DILATION = 5


def scout_mask(tumour: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """What bias correction leaves out of its fit: the scout's ``tumour`` inside ``brain``, dilated by
    SCOUT_DILATION, with the brain it encloses in an axial, coronal or sagittal slice. The network can read
    a solidly enhancing or cystic core as brain; N4 fitted over that core flattened its enhancement
    (held-out `00218`: T1c of the core over brain 1.78 -> 1.30, TC 0.18), and a core inside the edema is a
    hole of the scout in some slice (a 3D fill missed it: the hole opens to the brain somewhere)."""
    if tumour.shape != brain.shape:
        raise ValueError(f"tumour mask {tumour.shape} and brain mask {brain.shape} differ in shape")
    grown = dilate(tumour & brain, SCOUT_DILATION)
    return grown | (enclosed_in_a_slice(grown) & brain)


class EnsemblePredictor:
    """Runs K fold models on a case: one pass per tile per model, probabilities averaged per task.

    The constructor takes the knobs; `load_models` (or the CLI's weight loader) supplies the networks;
    `predict_case` does the work (`predict_probabilities` for a crop, `predict_labels` for labels alone).
    With the fast tiling each fold has its own tile grid (`TilePlanner.grid_shift`); ``shift_folds=False``
    gives every fold fold 0's grid. ``scales``: the ensemble runs once on the crop resampled by each factor
    (1 = as it is), each pass's probabilities are resampled back and the passes averaged (test-time scaling).
    """

    def __init__(self, device: str = "auto", tiling: str = "fast", max_tile: Sequence[int] = FAST_TILE,
                 margin: int = FAST_MARGIN, precision: str = "auto", crop_margin: int = CROP_MARGIN,
                 shift_folds: bool = True, tta: str = "none", fusion: str = "regions",
                 scales: Sequence[float] = (1.0,)):
        self.device = resolve_device(device)
        self.tiling = parse_option(Tiling, tiling, "tiling")
        self.planner = TilePlanner(self.tiling, tuple(max_tile), margin, shift_folds)  # type: ignore[arg-type]
        self.crop_margin = crop_margin
        self.tta = parse_option(Mirroring, tta, "tta")
        self.fusion = parse_option(Fusion, fusion, "fusion")
        self.scales = parse_scales(scales)
        self.precision = resolve_precision(precision, self.device)
        self._precision_option = precision  # the CPU fallback resolves it for the CPU
        self.runner = TiledEnsemble(self._reduce, self._batch_voxels())
        self.models: list[nn.Module] = []
        self._source_models: list[nn.Module] = []
        self._fallback: EnsemblePredictor | None = None
        self._fallback_lock = threading.Lock()

    def load_models(self, models: Sequence[nn.Module]) -> EnsemblePredictor:
        if not models:
            raise ValueError("at least one model is needed")
        # Channels-last suits both cuDNN and oneDNN: on a 2-core AVX-512 CPU the network runs 1.7x faster
        # with identical labels (benchmarks/benchmark.py), so it is the layout on every device.
        self._source_models = list(models)
        self.models = [fold_batchnorm(m).to(self.device, memory_format=torch.channels_last_3d) for m in models]
        self._fallback = None
        return self

    def mirrors(self, fold_index: int) -> tuple[tuple[int, ...], ...]:
        """The axis flips the ``fold_index``-th model's tiles are run under (outputs flipped back, averaged)."""
        if self.tta is Mirroring.FULL:
            return MIRRORS
        if self.tta is Mirroring.FOLDS:
            return (MIRRORS[fold_index % len(MIRRORS)],)
        return ((),)

    def plan(self, shape: Sequence[int], fold_index: int = 0, region: tuple[slice, ...] | None = None) -> list[Tile]:
        return self.planner.plan(shape, fold_index, region)

    @torch.inference_mode()
    def predict_probabilities(self, image: np.ndarray, progress: Progress | None = None,
                              region: tuple[slice, ...] | None = None) -> TaskProbabilities:
        """Fold-averaged (and scale-averaged) task probabilities for a normalised (4, D, H, W) crop, computed
        over ``region`` of it (default: all of it; elsewhere every probability is 0)."""
        return self._device_probabilities(image, progress, region).to_numpy()

    def predict_labels(self, image: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        """Fused internal labels (0/1/2/3) for a raw (4, D, H, W) case, before post-processing."""
        return self.predict_case(image, progress).labels

    @torch.inference_mode()
    def scout_tumour(self, image: np.ndarray) -> np.ndarray:
        """A generous whole-tumour mask of a raw (4, D, H, W) case: the first SCOUT_FOLDS folds' task-1
        tumour (P > 0.5) on the normalised image, dilated by SCOUT_DILATION. Bias correction fits its field
        outside it, so that a large bright edema is not taken for a bias field and flattened."""
        mask = np.zeros(image.shape[1:], bool)
        crop = crop_to_brain(image, self.crop_margin)
        if crop is None:
            return mask
        try:
            # Always on the fast tiling's grid, whatever `tiling` the final pass uses: the scout only prepares
            # the input, and the tiling knob must change nothing but the final pass (with a scout per
            # tiling, `fast` and `paper` corrected a doubtful case differently: benchmarks/agreement.py).
            planner = replace(self.planner, tiling=Tiling.FAST)
            probabilities = self._device_probabilities(crop.image, None, planner.segmented_region(crop.mask),
                                                        self.models[:SCOUT_FOLDS], planner, scales=(1.0,))
        except DeviceOutOfMemory:
            return self._cpu_fallback().scout_tumour(image)
        mask[crop.box] = scout_mask(to_host(probabilities.tumour > 0.5), crop.mask)
        return mask

    def predict_case(self, image: np.ndarray, progress: Progress | None = None) -> CasePrediction:
        """Normalise a raw (4, D, H, W) case, crop it to the brain, run the ensemble and fuse.

        When the device runs out of memory even for a single tile, the case is run again on the CPU and
        the prediction carries `CPU_FALLBACK_WARNING`."""
        try:
            return self._predict_case(image, progress)
        except DeviceOutOfMemory:
            prediction = self._cpu_fallback()._predict_case(image, progress)
            prediction.warnings.append(CPU_FALLBACK_WARNING)
            return prediction

    def _cpu_fallback(self) -> EnsemblePredictor:
        """The same ensemble and knobs on the CPU, built once, for a case the device cannot hold."""
        with self._fallback_lock:  # a reader's scout and the device's ensemble may both need it
            if self._fallback is None:
                self._fallback = EnsemblePredictor(
                    "cpu", self.tiling.value, self.planner.max_tile, self.planner.margin, self._precision_option,
                    self.crop_margin, self.planner.shift_folds, self.tta.value, self.fusion.value, self.scales,
                ).load_models(self._source_models)
            return self._fallback

    @torch.inference_mode()
    def _predict_case(self, image: np.ndarray, progress: Progress | None) -> CasePrediction:
        clock = time.perf_counter()
        crop = crop_to_brain(image, self.crop_margin)
        labels = np.zeros(image.shape[1:], np.uint8)
        if crop is None:
            return CasePrediction(labels, None, None, None, {"preprocess": time.perf_counter() - clock})
        timings = {"preprocess": time.perf_counter() - clock}
        clock = time.perf_counter()
        probabilities = self._device_probabilities(crop.image, progress, self.planner.segmented_region(crop.mask))
        self._synchronize()
        timings["network"] = time.perf_counter() - clock
        clock = time.perf_counter()
        fused, region = self._fuse(probabilities)
        probabilities = probabilities.to_numpy()
        labels[crop.box] = fused * crop.mask
        timings["fusion"] = time.perf_counter() - clock
        return CasePrediction(labels, crop.box, probabilities, region, timings)

    def _fuse(self, probabilities: TaskProbabilities) -> tuple[np.ndarray, np.ndarray]:
        """(labels, task-2 region) on the host, fused where the probabilities are: on a GPU only the
        results cross to the host."""
        if self.device.type == "cuda":
            labels, region = fuse_tensors(probabilities, self.fusion)
            return labels.cpu().numpy(), region.cpu().numpy()
        host = probabilities.to_numpy()
        region = fusion_region(host)
        return fuse(host, region, self.fusion), region

    def _device_probabilities(self, image: np.ndarray, progress: Progress | None,
                              region: tuple[slice, ...] | None,
                              models: Sequence[nn.Module] | None = None,
                              planner: TilePlanner | None = None,
                              scales: Sequence[float] | None = None) -> TaskProbabilities:
        """The ensemble's task probabilities over ``image``, a pass per scale, averaged, on the device.
        The scout runs at scale 1 only: like the tiling, the scales change nothing but the final pass."""
        if not self.models:
            raise RuntimeError("no models loaded: call load_models first")
        models = self.models if models is None else models
        planner = self.planner if planner is None else planner
        scales = self.scales if scales is None else scales
        crop = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        # Plans come from the shapes alone; each pass's resampled input is built when its turn comes and
        # freed after it, so at most one enlarged crop is held at a time.
        shapes = [scaled_shape(crop.shape[1:], s) for s in scales]
        regions = [scaled_region(region, crop.shape[1:], shape) for shape in shapes]
        plans = [[planner.plan(shape, k, r) for k in range(len(models))] for shape, r in zip(shapes, regions)]
        mirrors = [self.mirrors(k) for k in range(len(models))]
        total, before = sum(len(p) for per_pass in plans for p in per_pass), 0
        sums: list[torch.Tensor] | None = None
        for scale, per_pass in zip(scales, plans):
            report = None if progress is None else partial(_offset_progress, progress, before, total)
            outputs = self.runner.run(models, scaled_input(crop, scale), per_pass, mirrors, report)
            if outputs[0].shape[-3:] != crop.shape[1:]:  # back onto the crop, 0 where a pass at scale 1 leaves 0
                for i, output in enumerate(outputs):  # one at a time: each enlarged output goes once resampled
                    outputs[i] = zero_outside_(resample(output, crop.shape[1:]), region)
                del output
            if sums is None:
                sums = outputs
            else:
                for running, o in zip(sums, outputs):
                    running += o
            before += sum(len(p) for p in per_pass)
        assert sums is not None
        if len(scales) > 1:
            for running in sums:  # in place, like the sums
                running /= len(scales)
        return TaskProbabilities(*sums)

    def _reduce(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self._autocast():
            return omnet_probabilities(model, x)

    def _autocast(self):
        if self.precision is Precision.FP32:
            return ieee_fp32()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":  # stage timings must not hide queued kernels
            torch.cuda.synchronize(self.device)

    def _batch_voxels(self) -> int:
        """Input voxels per forward pass: ~2M keeps a GPU busy; on a CPU, ~0.5M runs 1.3-1.4x faster per voxel
        than 2M (the activations stay nearer the caches; benchmarks/benchmark.py, 2-core AVX-512 CPU)."""
        return 1 << 21 if self.device.type == "cuda" else 1 << 19
