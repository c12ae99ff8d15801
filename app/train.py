"""Training of OM-Net (+CGA/SE) and the three-model cascade: patch streams, curriculum, online data
transfer, k-fold ensembles, resumable checkpoints (docs/ALGORITHM.md, "Training").

Cases are read through the prediction I/O (`app.io`), so BraTS 2018/2021/2023 training folders work as
they are. Step counts replace the paper's epochs (an epoch of random patches has no fixed size).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .augment import AugmentConfig, augment_batch
from .conventions import (
    ENHANCING,
    MODALITY_ORDER,
    NECROSIS,
    NORMAL_BRAIN,
    Layout,
    TruthRecoding,
    from_file_labels,
    ground_truth_convention,
)
from .errors import one_line
from .fusion import dilate, to_host
from .inference import EnsemblePredictor, ieee_fp32, native_bf16, resolve_device, scout_mask
from .io import CaseError, CaseFiles, cases_with_ground_truth, load_case, load_segmentation, unread_files_note
from .metrics import region_dice
from .model import CORE_CLASSES, TUMOUR_CLASSES, build_model
from .options import AugmentLevel, BiasCorrection, Device, Precision, Variant, parse_option
from .phantoms import DEFAULT_MIX, PhantomMix, make_phantom
from .preprocess import TRAINING_CROP_MARGIN, Reorientation, brain_mask, correct_bias, crop_to_brain
from .tiling import DIVISOR, FAST_TILE, poolable
from .weights import WeightsError, read_manifest, save_state, select_folds, sha256_of, write_json_atomic, write_manifest

log = logging.getLogger("omnet.train")


class TrainingSetupError(ValueError):
    """A training request that cannot run (a fold outside the ensemble, a device that is not there, an
    arithmetic the device cannot train in); raised before any case is prepared."""


PATCH = (16, 32, 32)
# Task-2 centres lie in the ground-truth whole tumour dilated by this many voxels.
TASK2_DILATION = 5
TRANSFER_TUMOUR = 0.4
TRANSFER_CORE = 0.5


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in checkpoints and the manifest."""

    variant: str = Variant.OMNET_CGA.value  # app.options.TRAINABLE_VARIANTS
    width: int = 32
    folds: int = 10
    stage_steps: tuple[int, int, int] = (1000, 1000, 18000)  # curriculum: task 1, +task 2, +task 3
    curriculum: bool = True  # False: all tasks from step 0 (OM-Net0)
    transfer: bool = True  # online data transfer (OM-Net0 turns it off)
    batch: int = 20  # patches per task per step
    lr: float = 1e-3
    momentum: float = 0.99
    weight_decay: float = 5e-4
    lr_halve_every: int = 4000  # steps (the paper halves every 4 epochs)
    validate_every: int = 500
    val_cases: int = 0  # 0 = the whole held-out fold
    seed: int = 0
    device: str = Device.AUTO.value
    max_tile: tuple[int, int, int] = FAST_TILE  # validation uses predict's default fast tiling
    # Model weights to start from (fine-tuning, warm starts): a safetensors file, or a weights folder whose
    # fold K each fold K starts from (`starting_point`).
    init_from: str | None = None
    augment: str = AugmentLevel.DEFAULT.value  # app.options.AugmentLevel (app/augment.py)
    precision: str = Precision.AUTO.value  # training arithmetic (`training_autocast`)
    augment_acquisition: float = 0.0  # per patch: blur / thick slices on all channels alike (AugmentConfig)
    augment_tumour_contrast: float = 0.0  # per channel: each tumour sub-region's own contrast (AugmentConfig)
    # Our additions (the paper draws cases uniformly and task-1 centres uniformly over the brain; 1.0 and
    # 0.0 keep that): how much more often a case of a rare tumour kind is drawn (`case_probabilities`),
    # and the fraction of task-1 patches centred near the tumour instead of anywhere in the brain.
    rare_case_weight: float = 1.0
    task1_tumour_fraction: float = 0.0
    hard_case_power: float = 0.0  # 0: off; else cases drawn by their running task-1 loss (`CaseDifficulty`)
    # -1: off; else from this step on a uniform running average of the weights after every step is kept,
    # validated beside the model, and published instead of the best snapshot (`WeightAverage`).
    average_from: int = -1
    # Training patch (the paper's 16x32x32). Larger patches give the network the context the fast tiling's
    # 24x48x48 tiles give it at inference; the prepared cases stay padded by half of PATCH, and a larger
    # patch reads zeros beyond that, as a tile does beyond the crop (`sample_patches`).
    patch_size: tuple[int, int, int] = PATCH
    # Whether the training step's network runs through torch.compile (PyTorch Inductor): fewer, fused
    # kernels for the same network (its dropout draws Inductor's own random numbers). Off by default:
    # compiling takes tens of seconds per process and needs a C++ compiler on a CPU, Triton on a GPU
    # (`check_compile`).
    compile: bool = False
    # app.options.BiasCorrection: n4 corrects every training case first, as `predict` corrects a case before
    # the ensemble sees it (fitted outside the true tumour grown as the scout's is: `bias_corrected`). none
    # by default: the shipped folds were trained on uncorrected cases (EXPERIMENTS round 66).
    bias_correction: str = BiasCorrection.NONE.value

    @property
    def total_steps(self) -> int:
        return int(sum(self.stage_steps))

    def active_tasks(self, step: int) -> tuple[int, ...]:
        """Tasks trained at ``step`` (0-based): the curriculum adds task 2, then task 3."""
        if not self.curriculum:
            return (0, 1, 2)
        s1, s2, _ = self.stage_steps
        if step < s1:
            return (0,)
        if step < s1 + s2:
            return (0, 1)
        return (0, 1, 2)


# -------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CaseHandle:
    """A training case from any source: its ID and a loader of (raw image (4, D, H, W), internal labels).

    Loaders are picklable (module-level functions with their arguments bound), so cases can be prepared
    in worker processes."""

    case_id: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    cache_key: str = ""  # its prepared arrays' name in a cache folder, where it is not the case ID

    @property
    def cache_name(self) -> str:
        return self.cache_key or self.case_id


def _load_files(case: CaseFiles, recoding: TruthRecoding | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A case's image and internal labels (its truth's file labels re-coded by ``recoding`` first), stored as
    BraTS stores a brain, as prediction reads it too (`Reorientation`): a network must learn the storage it
    will be shown."""
    loaded = load_case(case)
    for warning in loaded.warnings:  # read as prediction reads it, and trained on: the user is told why
        log.warning("case %s [%s]: %s", case.case_id, case.reference.parent, warning)
    file_labels = load_segmentation(case, loaded.reference)
    if recoding is not None:
        file_labels = recoding.apply(file_labels)
    try:
        labels = from_file_labels(file_labels, ground_truth_convention(case.layout))
    except ValueError as err:  # a label this model cannot train on: the case and file named, as a bad image is
        raise CaseError(case.case_id, case.segmentation, str(err)) from None
    turn = Reorientation.for_direction(loaded.reference.GetDirection())
    return (loaded.image, labels) if turn is None else (turn.to_working(loaded.image), turn.to_working(labels))


def _load_phantom(seed: int, index: int, size: tuple[int, int, int], mix: PhantomMix) -> tuple[np.ndarray, np.ndarray]:
    phantom = make_phantom(seed, index, size, ranges=mix.ranges_of_case(index))
    return np.stack([phantom.images[m].astype(np.float32) for m in MODALITY_ORDER]), phantom.labels


def as_handle(case: CaseFiles | CaseHandle, recoding: TruthRecoding | None = None) -> CaseHandle:
    """A handle of a case on disk (its truth re-coded by ``recoding``, cached under a name that says so), or
    the handle itself."""
    if isinstance(case, CaseHandle):
        return case
    if recoding is None:
        return CaseHandle(case.case_id, partial(_load_files, case))
    key = f"{case.case_id}.recoded-" + str(recoding).replace(":", "to").replace(",", "-")
    return CaseHandle(case.case_id, partial(_load_files, case, recoding), key)


def folder_cases(data_dir: Path, recoding: TruthRecoding | None = None) -> list[CaseHandle]:
    """The cases with ground truth in a BraTS training folder (any layout `find_cases` reads; the truths'
    labels re-coded by ``recoding`` as they are read), a warning naming those without; `TrainingSetupError`
    when the folder is missing, holds no such case or a case that cannot be assembled."""
    left_out: list[str] = []
    unread: list[Path] = []
    try:
        cases = cases_with_ground_truth(data_dir, left_out, unread)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"--data {data_dir}: {err}") from err
    if left_out:  # a misnamed ground truth (BraTS 2020's case 355 ships one) must not vanish unseen
        log.warning("%d case(s) under %s have no ground truth named <ID>-seg, <ID>_seg or seg and are left out of "
                    "training: %s", len(left_out), data_dir, ", ".join(left_out))
    if unread:  # nor may a case under names we do not know
        log.warning("%s: %s", data_dir, unread_files_note(unread, data_dir))
    return [as_handle(c, recoding) for c in cases]


def _load_bias_corrected(load: Callable[[], tuple[np.ndarray, np.ndarray]], case_id: str
                          ) -> tuple[np.ndarray, np.ndarray]:
    raw, labels = load()
    # The true tumour stands in for prediction's scout, grown and filled the same way (`scout_mask`).
    exclude = scout_mask(labels > 0, brain_mask(raw))
    corrected = correct_bias(raw, list(MODALITY_ORDER), exclude=exclude, workers=torch.get_num_threads())
    for warning in corrected.warnings:
        log.warning("case %s: %s", case_id, warning)
    return corrected.image, labels


def bias_corrected(handles: Sequence[CaseHandle]) -> list[CaseHandle]:
    """The same cases, each N4-corrected as it is loaded, as prediction corrects a case (`correct_bias`), fitted
    outside its true tumour; cached under their own names, so uncorrected arrays in a shared cache stay apart."""
    return [CaseHandle(h.case_id, partial(_load_bias_corrected, h.load, h.case_id), f"{h.cache_name}.n4")
            for h in handles]


def training_handles(cases: Path | Sequence[CaseHandle], recoding: TruthRecoding | None = None,
                     bias_correction: BiasCorrection | str = BiasCorrection.NONE) -> list[CaseHandle]:
    """The handles a run trains on: a BraTS training folder's cases (`folder_cases`, truths re-coded by
    ``recoding``) or the given handles, each N4-corrected as it loads when ``bias_correction`` says ``n4``."""
    handles = folder_cases(Path(cases), recoding) if isinstance(cases, (str, Path)) else list(cases)
    if parse_option(BiasCorrection, bias_correction, "bias_correction") is BiasCorrection.N4:
        handles = bias_corrected(handles)
    return handles


def phantom_cases(n: int, seed: int, size: tuple[int, int, int], mix: PhantomMix = DEFAULT_MIX) -> list[CaseHandle]:
    """``n`` generated phantoms of series ``seed``, drawn as ``mix`` says, made in memory when first needed
    (no NIfTI files)."""
    if n < 1:
        raise ValueError(f"need at least one phantom, got {n}")
    return [CaseHandle(mix.case_id(Layout.BRATS2023, seed, i), partial(_load_phantom, seed, i, tuple(size), mix))
            for i in range(n)]


@dataclass
class TrainingCase:
    """A case prepared for patch sampling: normalised, cropped to the brain, padded by half a patch.

    On a GPU ``image`` and ``target`` are device tensors (see `to_device`); elsewhere numpy arrays."""

    case_id: str
    image: Any  # (4, D, H, W) float32 (float16 on a GPU)
    target: Any  # (D, H, W) uint8, internal 5 classes (0 bg, 1 NCR, 2 ED, 3 ET, 4 brain)
    centres: list[np.ndarray]  # per task: flat indices of allowed patch centres
    offset: Any  # (4,) brain mean / std per modality: normalised + offset is proportional to raw


def prepare_case(case: CaseFiles | CaseHandle, cache_dir: Path | None = None) -> TrainingCase:
    """Normalise, crop and pad a case and index its sampling regions; with ``cache_dir`` the arrays are
    stored as .npy once and memory-mapped afterwards, so concurrent fold jobs share one copy."""
    handle = as_handle(case)
    if cache_dir is not None:
        cached = _load_cached(handle, cache_dir)
        if cached is not None:
            return cached
    prepared = prepare_arrays(handle.case_id, *handle.load())
    if cache_dir is not None:
        _store_cached(prepared, cache_dir, handle.cache_name)
    return prepared


def prepare_all(cases: Sequence[CaseHandle], cache_dir: Path, workers: int) -> None:
    """Fill ``cache_dir`` for every case, ``workers`` processes at a time (phantoms are made there too)."""
    todo = [c for c in cases if _load_cached(c, cache_dir) is None]
    if not todo:
        return
    log.info("preparing %d cases with %d workers", len(todo), workers)
    with ProcessPoolExecutor(max_workers=max(1, workers), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        list(pool.map(partial(prepare_case, cache_dir=cache_dir), todo))


_CACHE_PARTS = ("image", "target", "c0", "c1", "c2", "offset")


def _cache_paths(name: str, cache_dir: Path) -> list[Path]:
    return [cache_dir / f"{name}.{part}.npy" for part in _CACHE_PARTS]


def _load_cached(handle: CaseHandle, cache_dir: Path) -> TrainingCase | None:
    paths = _cache_paths(handle.cache_name, cache_dir)
    if not all(p.is_file() for p in paths):
        return None
    image, target, *centres, offset = (np.load(p, mmap_mode="r") for p in paths)
    return TrainingCase(handle.case_id, image, target, list(centres), np.asarray(offset))


def _store_cached(case: TrainingCase, cache_dir: Path, name: str) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = [case.image, case.target, *case.centres, case.offset]
    for path, array in zip(_cache_paths(name, cache_dir), arrays):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.npy")
        np.save(tmp, array)
        os.replace(tmp, path)


def prepare_arrays(case_id: str, raw: np.ndarray, labels: np.ndarray) -> TrainingCase:
    """A `TrainingCase` from a raw (4, D, H, W) image and its internal labels."""
    brain = crop_to_brain(raw, TRAINING_CROP_MARGIN)
    if brain is None:
        raise ValueError(f"{case_id}: the image is empty (no brain voxel)")
    crop = raw[(slice(None), *brain.box)]
    image = brain.image
    offset = np.array([_mean_over_std(crop[c][brain.mask]) for c in range(crop.shape[0])], np.float32)
    target = labels[brain.box].copy()
    target[(target == 0) & brain.mask] = NORMAL_BRAIN
    half = [p // 2 for p in PATCH]
    image = np.pad(image, [(0, 0)] + [(h, h) for h in half])
    target = np.pad(target, [(h, h) for h in half])
    tumour = np.isin(target, TUMOUR_CLASSES)
    core = np.isin(target, CORE_CLASSES)
    inner = np.zeros_like(tumour)
    inner[tuple(slice(h, -h) for h in half)] = True
    streams = [(target > 0) & inner, dilate(tumour, TASK2_DILATION) & inner, core & inner]
    # Cases without tumour (or core) fall back to the brain so every stream can always sample.
    centres = [np.flatnonzero(s if s.any() else streams[0]) for s in streams]
    return TrainingCase(case_id, image, target, centres, offset)


def _mean_over_std(values: np.ndarray) -> float:
    values = values.astype(np.float64)
    std = values.std()
    return float(values.mean() / std) if std > 0 else 0.0


def to_device(case: TrainingCase, device: torch.device) -> TrainingCase:
    """On a GPU, the case's arrays move there once (image as float16) so patches are gathered on the
    device and no step copies from the host; on a CPU it is returned as it is."""
    if device.type == "cpu":
        return case
    image = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float16)).to(device)
    target = torch.from_numpy(np.ascontiguousarray(case.target)).to(device)
    offset = torch.from_numpy(np.asarray(case.offset, np.float32)).to(device)
    return TrainingCase(case.case_id, image, target, case.centres, offset)


def case_to_host(case: TrainingCase) -> TrainingCase:
    """A case `to_device` moved, back in host memory (the image stays float16)."""
    return TrainingCase(case.case_id, to_host(case.image), to_host(case.target), case.centres, to_host(case.offset))


# A GPU holds the training cases only when all of them fit in this share of its free memory; the rest is
# left to the network, its activations and cuDNN's workspace. A BraTS 2023 training set (1,251 cases of about
# 47 MB there) needs some 59 GB: an 80 GB card just holds it, a 24-48 GB one does not.
DEVICE_CASE_SHARE = 0.75
# Without --cache the host holds every prepared case (float32); past this share of its memory, say so.
HOST_CASE_SHARE = 0.5


def device_bytes(case: TrainingCase) -> int:
    """Bytes a prepared case takes on a GPU (`to_device`: the image as float16, the labels as uint8)."""
    return 2 * math.prod(case.image.shape) + math.prod(case.target.shape)


def host_bytes(case: TrainingCase) -> int:
    """Bytes a prepared case takes in host memory when it is not memory-mapped."""
    return case.image.nbytes + case.target.nbytes + sum(c.nbytes for c in case.centres)


def physical_memory() -> int:
    """The host's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class PreparedCases:
    """The prepared training cases of one process, kept from one fold to the next.

    On a GPU they are moved there (`to_device`) when the run's ``total_cases`` fit its free memory, judged
    once from the first case's size; otherwise, or when the GPU runs out of memory while they move, every
    case stays on (or returns to) the host, memory-mapped from ``cache_dir`` when there is one, and each step
    copies its patches to the GPU. The same training, only the patches' journey differs."""

    device: torch.device
    total_cases: int
    cache_dir: Path | None = None
    resident: bool | None = None  # on the GPU; None until the first case is prepared
    cases: dict[str, TrainingCase] = field(default_factory=dict)

    def training_data(self, handles: Sequence[CaseFiles | CaseHandle]) -> list[TrainingCase]:
        for handle in handles:
            if handle.case_id not in self.cases:
                case = prepare_case(handle, self.cache_dir)
                if self.resident is None:
                    self.resident = self._fits(case)
                self.cases[handle.case_id] = self._place(case)
        return [self.cases[h.case_id] for h in handles]

    def _fits(self, case: TrainingCase) -> bool:
        if self.device.type != "cuda":
            self._check_host(case)
            return False
        need = device_bytes(case) * self.total_cases
        free = torch.cuda.mem_get_info(self.device)[0]
        if need <= DEVICE_CASE_SHARE * free:
            return True
        log.warning("the %d training cases need about %.1f GiB on the GPU, more than %.0f%% of its %.1f GiB "
                    "free: they stay on the host and each step copies its patches to the GPU", self.total_cases,
                    need / 2**30, 100 * DEVICE_CASE_SHARE, free / 2**30)
        self._check_host(case)
        return False

    def _check_host(self, case: TrainingCase) -> None:
        need, memory = host_bytes(case) * self.total_cases, physical_memory()
        if self.cache_dir is None and memory and need > HOST_CASE_SHARE * memory:
            log.warning("the %d training cases need about %.1f GiB of host memory, over %.0f%% of its %.1f GiB: "
                        "pass --cache DIR to keep them on disk, memory-mapped", self.total_cases, need / 2**30,
                        100 * HOST_CASE_SHARE, memory / 2**30)

    def _place(self, case: TrainingCase) -> TrainingCase:
        if not self.resident:
            return case
        try:
            return to_device(case, self.device)
        except torch.cuda.OutOfMemoryError:
            self.resident = False
            self.cases = {case_id: case_to_host(c) for case_id, c in self.cases.items()}
            torch.cuda.empty_cache()
            log.warning("the GPU ran out of memory after %d training cases: every case stays on the host and "
                        "each step copies its patches to the GPU", len(self.cases))
            return case


def sample_patches(cases: Sequence[TrainingCase], task: int, count: int, rng: np.random.Generator,
                   with_offsets: bool = False, case_probabilities: np.ndarray | None = None,
                   with_cases: bool = False, patch_size: Sequence[int] = PATCH):
    """``count`` patches of ``patch_size`` whose centres lie in ``task``'s region of randomly chosen cases:
    (images, targets), numpy arrays or device tensors as the cases hold them; with ``with_offsets`` also
    each patch's case offset (count, 4), with ``with_cases`` then each patch's case index (count,).
    ``case_probabilities`` (one per case) replaces the uniform choice of cases."""
    images, targets, offsets, chosen = [], [], [], []
    for _ in range(count):
        if case_probabilities is None:
            index = int(rng.integers(len(cases)))
        else:
            index = int(rng.choice(len(cases), p=case_probabilities))
        case = cases[index]
        chosen.append(index)
        flat = case.centres[task][rng.integers(len(case.centres[task]))]
        centre = np.unravel_index(flat, tuple(case.target.shape))
        starts = [int(c) - p // 2 for c, p in zip(centre, patch_size)]
        images.append(_window(case.image, starts, patch_size))
        targets.append(_window(case.target, starts, patch_size))
        offsets.append(case.offset)
    stack = torch.stack if isinstance(images[0], torch.Tensor) else np.stack
    out = (stack(images), stack(targets)) + ((stack(offsets),) if with_offsets else ())
    return out + ((np.array(chosen, np.int64),) if with_cases else ())


def _window(array, starts: Sequence[int], size: Sequence[int]):
    """``array[..., s:s+n, ...]`` over its last three axes, zero where the window leaves the array (a patch
    larger than the case's padding); numpy arrays and torch tensors alike."""
    shape = array.shape[-3:]
    inside = tuple(slice(min(max(s, 0), d), min(max(s + n, 0), d)) for s, n, d in zip(starts, size, shape))
    before = [min(max(-s, 0), n) for s, n in zip(starts, size)]
    after = [n - b - (w.stop - w.start) for w, b, n in zip(inside, before, size)]
    patch = array[(Ellipsis, *inside)]
    if not any(before) and not any(after):
        return patch
    if isinstance(patch, torch.Tensor):  # F.pad takes (before, after) pairs from the last axis backwards
        return F.pad(patch, [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)])
    return np.pad(patch, [(0, 0)] * (patch.ndim - 3) + list(zip(before, after)))


# A case is of a rare kind when its core has (almost) no enhancing rim, is (almost) solidly enhancing, or
# is small: a uniform draw shows few such patches, and a model trained on it calls them normal brain.
RARE_ET_FRACTION = 0.05
RARE_NCR_FRACTION = 0.10
RARE_CORE_VOXELS = 3000


def is_rare_kind(target: Any) -> bool:
    """Whether a case's internal label map (numpy or tensor) holds a rare tumour kind (see above)."""
    counts = np.bincount(np.asarray(to_host(target)).ravel(), minlength=NORMAL_BRAIN + 1)
    core = int(counts[NECROSIS] + counts[ENHANCING])
    if core == 0:
        return False
    return (counts[ENHANCING] < RARE_ET_FRACTION * core or counts[NECROSIS] < RARE_NCR_FRACTION * core
            or core < RARE_CORE_VOXELS)


def case_probabilities(cases: Sequence[TrainingCase], rare_weight: float) -> np.ndarray | None:
    """Probability of drawing each case: a rare kind weighs ``rare_weight`` times a common one; None (the
    uniform draw) when the weight is 1 or the cases are all rare or all common."""
    if rare_weight <= 0:
        raise ValueError(f"rare_case_weight must be positive, got {rare_weight}")
    rare = np.array([is_rare_kind(c.target) for c in cases])
    if rare_weight == 1.0 or rare.all() or not rare.any():
        return None
    weights = np.where(rare, rare_weight, 1.0)
    return weights / weights.sum()


# Hard-case sampling (ours, `--hard-case-power`): each case's draw weight is multiplied by (its running
# task-1 patch loss / the mean over the cases seen) ** power, clipped to HARD_CASE_CLIP, so that the cases
# the network reads worst are drawn more often (on phantoms: edema that intensity cannot tell from grey
# matter, docs/EXPERIMENTS.md). The running loss of a case is an exponential moving average over its patches.
HARD_CASE_MOMENTUM = 0.9
HARD_CASE_CLIP = (0.25, 4.0)


@dataclass
class CaseDifficulty:
    """Running task-1 loss per training case (NaN until a case is first drawn) and the draw it implies."""

    power: float
    losses: np.ndarray

    @classmethod
    def start(cls, power: float, n_cases: int, saved: Sequence[float | None] | None = None) -> CaseDifficulty:
        """Equal difficulty for ``n_cases``, or the ``saved`` running losses of a resumed run (None = NaN)."""
        if power <= 0:
            raise ValueError(f"hard_case_power must be positive, got {power}")
        losses = np.full(n_cases, np.nan)
        if saved is not None:
            if len(saved) != n_cases:
                raise ValueError(f"{len(saved)} saved case losses for {n_cases} training cases")
            losses = np.array([np.nan if v is None else v for v in saved], np.float64)
        return cls(power, losses)

    def update(self, cases: np.ndarray, losses: np.ndarray) -> None:
        """Fold patch ``losses`` into the running loss of their ``cases`` (indices), one patch at a time."""
        for case, loss in zip(cases.tolist(), losses.tolist()):
            old = self.losses[case]
            self.losses[case] = loss if np.isnan(old) else HARD_CASE_MOMENTUM * old + (1 - HARD_CASE_MOMENTUM) * loss

    def probabilities(self, base: np.ndarray | None) -> np.ndarray:
        """The draw: ``base`` (None: uniform) times each case's clipped relative difficulty (1 if unseen)."""
        seen = ~np.isnan(self.losses)
        relative = np.ones(len(self.losses))
        if seen.any() and self.losses[seen].mean() > 0:
            relative[seen] = self.losses[seen] / self.losses[seen].mean()
        weights = np.clip(relative ** self.power, *HARD_CASE_CLIP)
        if base is not None:
            weights = weights * base
        return weights / weights.sum()

    def saved(self) -> list[float | None]:
        """The running losses as JSON can hold them (the fold's checkpoint), unrounded: a resumed run must
        draw from exactly the probabilities the uninterrupted one would."""
        return [None if np.isnan(v) else float(v) for v in self.losses]


def task_targets(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-task label maps: tasks 1 and 2 use the 5 classes, task 3 is ET vs the rest."""
    return target, target, (target == ENHANCING).long()


def transfer_masks(target: torch.Tensor, origin: torch.Tensor, enabled: bool) -> list[torch.Tensor]:
    """Which patches enter each task's loss (online data transfer, docs/ALGORITHM.md).

    ``origin`` is the stream each patch was sampled for (0, 1, 2). A task-1 patch with >= 40% tumour voxels
    also enters task 2; a task-1 or task-2 patch with >= 50% core voxels also enters task 3.
    """
    own = [origin == t for t in range(3)]
    if not enabled:
        return own
    voxels = target[0].numel()
    # Comparisons rather than isin with a class tensor: no host-to-device copy per step.
    tumour = sum(target == c for c in TUMOUR_CLASSES)
    core = sum(target == c for c in CORE_CLASSES)
    tumour_frac = tumour.flatten(1).sum(1) / voxels
    core_frac = core.flatten(1).sum(1) / voxels
    to_task2 = own[0] & (tumour_frac >= TRANSFER_TUMOUR - 1e-9)
    to_task3 = (own[0] | own[1]) & (core_frac >= TRANSFER_CORE - 1e-9)
    return [own[0], own[1] | to_task2, own[2] | to_task3]


# --------------------------------------------------------------------------------------- optimiser


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD as the authors' solver: weight decay on weights, biases at 2x lr without decay."""
    weights, biases = [], []
    for name, param in model.named_parameters():
        (biases if name.endswith("bias") else weights).append(param)
    return torch.optim.SGD(
        [
            {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
            {"params": biases, "lr": 2 * cfg.lr, "weight_decay": 0.0, "lr_mult": 2.0},
        ],
        lr=cfg.lr, momentum=cfg.momentum,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    lr = cfg.lr * 0.5 ** (step // cfg.lr_halve_every)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr


# -------------------------------------------------------------------------------- weight averaging


class WeightAverage:
    """A uniform running average of a model's weights over training steps (stochastic weight averaging,
    Izmailov et al. 2018; ours, `--average-from`).

    Why: fine-tunes of these folds trade one validation case for another from snapshot to snapshot, and an
    average over the trajectory sits in a flatter region of the loss than any one snapshot, which is what
    generalises to appearances outside the training data. BatchNorm running statistics are averaged like
    the weights (the average is a model of the same kind, folded at inference as any other); integer
    buffers take the latest value.
    """

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None  # restored from a checkpoint by `_FoldState.resume`
        self.count = 0
        self._model: nn.Module | None = None  # one copy reloaded at each validation, made on first use

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        if self.state is None or self.count == 0:
            self.state = {k: v.detach().clone() for k, v in current.items()}
        else:
            for key, value in current.items():
                kept = self.state[key]
                if kept.is_floating_point():
                    kept.add_(value.detach() - kept, alpha=1.0 / (self.count + 1))
                else:
                    kept.copy_(value)
        self.count += 1

    def model_like(self, model: nn.Module) -> nn.Module:
        """A model of ``model``'s kind holding the averaged weights (for validation); not ``model`` itself."""
        if self.state is None:
            raise ValueError("no weights averaged yet")
        if self._model is None:
            self._model = copy.deepcopy(model)
        self._model.load_state_dict(self.state, strict=True)
        return self._model


# ------------------------------------------------------------------------------------- checkpoints


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                      average: WeightAverage | None) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            buf = optimizer.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                state[f"momentum.{names[id(param)]}"] = buf
    if average is not None and average.count:
        state.update({f"average.{k}": v for k, v in average.state.items()})
    return state


def _restore_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor],
                        average: WeightAverage | None, averaged_steps: int) -> None:
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    params = dict(model.named_parameters())
    for key, value in state.items():
        if key.startswith("momentum."):
            optimizer.state[params[key[9:]]]["momentum_buffer"] = value
    kept = {k.removeprefix("average."): v for k, v in state.items() if k.startswith("average.")}
    if average is not None and kept and averaged_steps:
        average.state, average.count = kept, averaged_steps


# ---------------------------------------------------------------------------------------- training


@dataclass
class FoldResult:
    fold: int
    best_score: float
    best_step: int
    best_dice: dict[str, float]
    steps: int
    val_cases: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the fold's own settings (jobs may differ)
    averaged_steps: int = 0  # with `--average-from`: steps in the published weight average
    average_dice: dict[str, float] = field(default_factory=dict)  # its validation at the last check
    initialised_from: dict[str, Any] = field(default_factory=dict)  # with `--init-from`: see `starting_point`


def split_folds(case_ids: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    """Deterministic k-fold split of case IDs (shuffled by ``seed``)."""
    if folds < 2:
        raise TrainingSetupError(f"need at least 2 folds, got {folds}")
    if len(case_ids) < folds:  # every fold holds out at least one case
        raise TrainingSetupError(f"{len(case_ids)} case(s) cannot make {folds} folds")
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    return [sorted(order[k::folds].tolist()) for k in range(folds)]


@dataclass
class ValidationCase:
    case_id: str
    image: np.ndarray  # raw (4, D, H, W)
    truth: np.ndarray  # internal labels


def load_validation(cases: Sequence[CaseFiles | CaseHandle]) -> list[ValidationCase]:
    return [ValidationCase(h.case_id, *h.load()) for h in map(as_handle, cases)]


def validation_dice(model: nn.Module, cases: Sequence[ValidationCase], cfg: TrainConfig,
                   device: torch.device) -> dict[str, float]:
    """Mean WT/TC/ET Dice of the fused (not post-processed) prediction on full held-out cases."""
    predictor = EnsemblePredictor(device=device.type, tiling="fast", max_tile=cfg.max_tile)
    predictor.load_models([model])
    scores = [region_dice(predictor.predict_labels(c.image), c.truth) for c in cases]
    model.train()
    return {k: float(np.mean([s[k] for s in scores])) for k in ("WT", "TC", "ET")}


def starting_point(init_from: str, fold: int) -> tuple[str, dict[str, Any]]:
    """The file fold ``fold`` starts from, and its record for the fold's manifest row: ``init_from`` itself,
    or, when it is a weights folder, that folder's fold ``fold`` (checked against its manifest), so that one
    process can fine-tune every fold of an ensemble. A folder's record carries the starting fold's steps, data
    and own starting point, so a fold continued over several runs keeps its whole history. Raises
    `WeightsError` when ``init_from`` is neither, or the folder lacks the fold."""
    path = Path(init_from)
    if not path.is_dir():
        if not path.is_file():
            raise WeightsError(f"--init-from {init_from}: no such file or weights folder")
        return init_from, {"from": str(path.resolve()), "sha256": sha256_of(path)}
    manifest = read_manifest(path)
    [entry] = select_folds(manifest, [fold])
    row = manifest.record(fold)
    training = row.get("training", manifest.raw.get("training", {}))  # a combined folder's rows carry their own
    record = {"from": str(path.resolve()), "fold": fold, "sha256": entry.sha256, "steps": row.get("steps"),
              "data": training.get("data"), "initialised_from": row.get("initialised_from")}
    return str(entry.path), {k: v for k, v in record.items() if v is not None}


def train_fold(cfg: TrainConfig, train_cases: Sequence[CaseFiles | CaseHandle],
               val_cases: Sequence[CaseFiles | CaseHandle], fold_dir: Path, fold: int, progress: bool = True,
               cache_dir: Path | None = None, time_limit: float | None = None,
               prepared: PreparedCases | None = None) -> FoldResult:
    """Train one fold with resumable checkpoints in ``fold_dir``; keeps the best-validating snapshot.

    ``time_limit`` (seconds) ends training early at a validation point once exceeded (a cluster job's
    wall time); it counts from the end of data preparation. The steps actually done are recorded.
    ``prepared`` keeps the cases prepared (and placed: `PreparedCases`) between folds trained in one process.
    """
    device = resolve_device(cfg.device)
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed * 1000 + fold)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one patch shape throughout: let cuDNN pick its kernels
    # Channels-last: 1.7x faster training steps on a CPU (oneDNN), the layout cuDNN prefers too.
    model = build_model(cfg.variant, cfg.width).to(device, memory_format=torch.channels_last_3d).train()
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng([cfg.seed, fold])
    state = _FoldState(fold_dir)
    start, start_record = starting_point(cfg.init_from, fold) if cfg.init_from else (None, {})
    if start and not state.started:
        model.load_state_dict(load_file(start, device=str(device)), strict=True)
        log.info("fold %d: initialised from %s", fold, start)
    average = WeightAverage() if cfg.average_from >= 0 else None
    state.resume(model, optimizer, rng, device, average)
    if state.meta["step"] < cfg.total_steps:
        log.info("fold %d: preparing %d training cases", fold, len(train_cases))
        if prepared is None:
            prepared = PreparedCases(device, len(train_cases), cache_dir)
        data = prepared.training_data(train_cases)
        validation = [validation_case(prepare_case(c, cache_dir)) for c in val_cases]
        use_amp = training_autocast(cfg.precision, device)
        # fp32 training is IEEE fp32, as at inference: cuDNN would otherwise run its convolutions as TF32.
        with contextlib.nullcontext() if use_amp else ieee_fp32():
            _train_loop(cfg, model, optimizer, data, validation, state, rng, device, fold, progress, time_limit,
                        average, use_amp)
    result = state.result(fold, val_cases)
    result.config = _jsonable(asdict(cfg))
    result.initialised_from = start_record
    return result


def validation_case(case: TrainingCase) -> ValidationCase:
    """A held-out case for validation from its prepared (cropped, normalised) arrays: the prediction path
    normalises again, which leaves z-scores as they are, so no case is read or generated twice."""
    inner = tuple(slice(p // 2, -(p // 2)) for p in PATCH)
    image = np.asarray(case.image[(slice(None), *inner)], np.float32)
    truth = np.array(case.target[inner], np.uint8)
    truth[truth == NORMAL_BRAIN] = 0
    return ValidationCase(case.case_id, image, truth)


class _FoldState:
    """A fold's progress on disk: the step reached, the best validation so far and the history, written
    (with the model, optimiser, weight average and random states) after every validation so a killed run
    resumes.

    Why one file: the progress record rides in the checkpoint's metadata, so the weights, the average and
    the step they belong to are replaced together by one rename; a kill between two files cannot pair one
    step's weights with another's record. ``last.json`` is a readable copy, and ``average.safetensors`` the
    average exported for publishing.
    """

    def __init__(self, fold_dir: Path):
        self.state_path, self.meta_path = fold_dir / "last.safetensors", fold_dir / "last.json"
        self.best_path = fold_dir / "best.safetensors"
        self.average_path = fold_dir / "average.safetensors"
        self.meta: dict[str, Any] = {"step": 0, "best_score": -1.0, "best_step": -1, "best_dice": {}, "history": []}

    @property
    def started(self) -> bool:
        return self.state_path.is_file()

    def resume(self, model: nn.Module, optimizer, rng: np.random.Generator, device: torch.device,
               average: WeightAverage | None) -> None:
        """Continue from the checkpoint, if any. With ``average`` None a kept average is dropped, so a run
        resumed without ``--average-from`` publishes its best snapshot, not a stale average."""
        if not self.started:
            return
        with safe_open(str(self.state_path), framework="pt", device=str(device)) as f:  # one read
            saved = (f.metadata() or {}).get("progress")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        self.meta = json.loads(saved if saved is not None else self.meta_path.read_text())
        _restore_checkpoint(model, optimizer, tensors, average, self.meta.get("averaged_steps", 0))
        if average is None:
            self.meta.pop("averaged_steps", None)
            self.meta.pop("average_dice", None)
        rng.bit_generator.state = self.meta["rng"]
        torch.set_rng_state(torch.tensor(self.meta["torch_rng"], dtype=torch.uint8))
        log.info("resumed %s at step %d", self.meta_path.parent, self.meta["step"])

    def record(self, model: nn.Module, optimizer, rng: np.random.Generator, entry: dict[str, Any],
               dice: dict[str, float], stopped_early: bool, average: WeightAverage | None = None,
               average_dice: dict[str, float] | None = None) -> None:
        score = float(np.mean(list(dice.values())))
        if average is not None and average.count:
            self.meta.update(averaged_steps=average.count, average_dice=average_dice)
            save_state(average.state, self.average_path)  # before the checkpoint, which commits the step
        self.meta["history"].append(entry)
        if score > self.meta["best_score"]:
            self.meta.update(best_score=score, best_step=entry["step"], best_dice=dice)
            save_state(model.state_dict(), self.best_path)
        self.meta.update(step=entry["step"], running=entry["loss"], rng=rng.bit_generator.state,
                         torch_rng=torch.get_rng_state().tolist(), stopped_early=stopped_early)
        save_state(_checkpoint_state(model, optimizer, average), self.state_path,
                   metadata={"progress": json.dumps(self.meta)})
        write_json_atomic(self.meta, self.meta_path)

    def result(self, fold: int, val_cases: Sequence[Any]) -> FoldResult:
        m = self.meta
        return FoldResult(fold, m["best_score"], m["best_step"], m["best_dice"], m["step"],
                          [c.case_id for c in val_cases], m["history"],
                          averaged_steps=m.get("averaged_steps", 0), average_dice=m.get("average_dice") or {})


def _train_loop(cfg: TrainConfig, model: nn.Module, optimizer, data: Sequence[TrainingCase],
                validation: Sequence[ValidationCase], state: _FoldState, rng: np.random.Generator,
                device: torch.device, fold: int, progress: bool, time_limit: float | None,
                average: WeightAverage | None, use_amp: bool) -> None:
    started = time.monotonic()
    augment = AugmentConfig.for_level(cfg.augment, cfg.augment_acquisition, cfg.augment_tumour_contrast)
    probabilities = case_probabilities(data, cfg.rare_case_weight)
    if probabilities is not None:
        log.info("fold %d: %d of %d training cases of a rare tumour kind, drawn %gx as often", fold,
                 int(np.sum(probabilities > probabilities.min())), len(data), cfg.rare_case_weight)
    difficulty = None
    if cfg.hard_case_power > 0:
        difficulty = CaseDifficulty.start(cfg.hard_case_power, len(data), state.meta.get("case_losses"))
        log.info("fold %d: cases drawn by their running task-1 loss to the power %g", fold, cfg.hard_case_power)
    # The augmentation's generator is reseeded from ``rng`` after every validation, so a resumed run
    # draws exactly what the uninterrupted one would.
    generator = torch.Generator(device=device)
    generator.manual_seed(int(rng.integers(2**62)))
    stepped = step_network(model, cfg)
    bar = _progress_bar(cfg.total_steps, state.meta["step"], f"fold {fold}", progress)
    running = state.meta.get("running")
    sums: dict[str, torch.Tensor] = {}  # losses stay on the device between validations (no sync per step)
    counted = 0
    for step in range(state.meta["step"], cfg.total_steps):
        lr = set_learning_rate(optimizer, cfg, step)
        losses = train_step(stepped, optimizer, data, cfg, step, rng, device, use_amp, augment, generator,
                            probabilities, difficulty)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0) + value
        counted += 1
        if average is not None and step >= cfg.average_from:
            average.update(model)
        bar.update(1)
        done = step + 1
        out_of_time = time_limit is not None and time.monotonic() - started > time_limit
        if done % cfg.validate_every and done != cfg.total_steps and not out_of_time:
            continue
        means = {k: float(v) / counted for k, v in sums.items()}
        total = sum(v for k, v in means.items() if k.startswith("loss_task"))
        running = total if running is None else 0.5 * running + 0.5 * total
        dice = validation_dice(model, validation, cfg, device)
        average_dice = None
        if average is not None and average.count:
            average_dice = validation_dice(average.model_like(model), validation, cfg, device)
        entry = {"step": done, "loss": round(running, 5), **{k: round(v, 4) for k, v in means.items()},
                 **{f"dice_{k}": round(v, 4) for k, v in dice.items()},
                 **{f"average_dice_{k}": round(v, 4) for k, v in (average_dice or {}).items()},
                 "seconds": round(time.monotonic() - started, 1)}
        log.info("fold %d step %d: loss %.4f dice WT %.3f TC %.3f ET %.3f", fold, done, running,
                 dice["WT"], dice["TC"], dice["ET"])
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.1e}", tasks=len(cfg.active_tasks(step)))
        if difficulty is not None:
            state.meta["case_losses"] = difficulty.saved()
        state.record(model, optimizer, rng, entry, dice, out_of_time and done < cfg.total_steps, average,
                     average_dice)
        sums, counted = {}, 0
        generator.manual_seed(int(rng.integers(2**62)))
        if out_of_time:
            log.info("fold %d: time limit reached at step %d", fold, done)
            break
    bar.close()


def step_network(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The network `train_step` calls: ``model`` compiled when ``cfg.compile``. The compiled wrapper shares
    the model's parameters; validation, averaging and checkpoints keep using the model itself (its own
    state-dict names, eager evaluation at tile shapes the steps never see)."""
    return torch.compile(model) if cfg.compile else model


def check_compile(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse ``--compile`` where it cannot run, before any case is prepared: the cascade (its networks
    see batches whose size changes every step, so each step would compile anew) and a machine whose
    torch.compile backend is missing (no C++ compiler on a CPU, no Triton on a GPU), found by compiling
    a one-line function there."""
    if Variant(cfg.variant) is Variant.CASCADE:
        raise TrainingSetupError("--compile: the cascade's networks see a batch of a new size every step; "
                                 "compile the one-network variants only")
    try:
        torch.compile(lambda t: torch.relu(t) * 2.0)(torch.ones(8, device=device))
    except Exception as err:  # Inductor raises many types; what matters is that it cannot run here
        raise TrainingSetupError(f"--compile: torch.compile cannot run on {device.type} here "
                                 f"({one_line(err)})") from err


def training_autocast(precision: str, device: torch.device) -> bool:
    """Whether training steps run under bf16 autocast (the loss and the weights stay fp32). ``auto``
    means only on a GPU with native bf16 (emulated bf16 on pre-Ampere GPUs is slower than fp32).

    Raises `TrainingSetupError` for bf16 on a CPU: oneDNN's bf16 convolution backward returned NaN weight
    gradients (deepest encoder stage) within 35-150 steps from scratch in four runs here (torch 2.13,
    AVX512-BF16), where fp32 trains; a ~1.3x faster step is not worth a run that silently dies."""
    chosen = parse_option(Precision, precision, "precision")
    if chosen is Precision.AUTO:
        return device.type == "cuda" and native_bf16(device)
    if chosen is Precision.BF16 and device.type == "cpu":
        raise TrainingSetupError("--precision bf16 is refused on a CPU (oneDNN's bf16 convolution backward returned "
                                 "NaN gradients within 150 steps); train with fp32 or on a GPU")
    return chosen is Precision.BF16


def train_step(model, optimizer, data, cfg: TrainConfig, step: int, rng, device, use_amp: bool,
               augment: AugmentConfig | None = None, generator: torch.Generator | None = None,
               probabilities: np.ndarray | None = None,
               difficulty: CaseDifficulty | None = None) -> dict[str, torch.Tensor]:
    """One SGD step on a fresh batch of the active tasks' patches (cases drawn with ``probabilities``, see
    `case_probabilities`, reweighted by ``difficulty`` when given, which the step's task-1 losses then
    update); returns each task's loss as a detached device tensor (reading it would wait for the device)."""
    tasks = cfg.active_tasks(step)
    draw = probabilities if difficulty is None else difficulty.probabilities(probabilities)
    x, y, origin, offsets, cases = _batch(data, tasks, cfg.batch, rng, device, draw, cfg.task1_tumour_fraction,
                                          cfg.patch_size)
    if augment is not None:
        x, y = augment_batch(x, y, offsets, augment, generator, rng)
    cascade = Variant(cfg.variant) is Variant.CASCADE
    # Without transfer (the cascade never has it) each task's patches are exactly its own stream's.
    selected = transfer_masks(y, origin, cfg.transfer and not cascade)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        if cascade:  # MC3's networks are independent: each sees only its own task's patches (and BN stats)
            outputs = {task: model.nets[task](x[selected[task]]) for task in tasks}
        else:  # OM-Net's batches of the active tasks go through the backbone together and split at the heads
            outputs = model(x)
    per_task_targets = task_targets(y)
    loss = torch.zeros((), device=device)
    losses = {}
    for task in tasks:
        chosen = selected[task]
        if cascade:
            per_patch = _patch_cross_entropy(outputs[task], per_task_targets[task][chosen])
            task_loss = per_patch.mean()
        else:
            per_patch = _patch_cross_entropy(outputs[task], per_task_targets[task])
            task_loss = _masked_mean(per_patch, chosen)
        if task == 0 and difficulty is not None:
            # Task 1's own patches are the batch's first block in both variants (`_batch`); reading their
            # losses waits for the device, the price of the option.
            difficulty.update(cases[:cfg.batch], to_host(per_patch[:cfg.batch].detach()))
        loss = loss + task_loss
        losses[f"loss_task{task + 1}"] = task_loss.detach()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return losses


def _patch_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean voxel-wise cross-entropy of each patch: (B,)."""
    return F.cross_entropy(logits.float(), target, reduction="none").flatten(1).mean(1)


def _masked_mean(per_patch: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Mean of the ``chosen`` patches' losses only: the same value as indexing them out, without the host
    waiting for the device to count them."""
    weights = chosen.float()
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)


def _batch(data: Sequence[TrainingCase], tasks: Sequence[int], batch: int, rng: np.random.Generator,
           device: torch.device, case_probabilities: np.ndarray | None = None, task1_tumour_fraction: float = 0.0,
           patch_size: Sequence[int] = PATCH):
    """Patches of every active task, concatenated: images (channels-last), long labels, each patch's
    stream and its case's offsets, all on ``device``, and each patch's case index (numpy). A
    ``task1_tumour_fraction`` of task 1's patches are centred where task 2's are (near the tumour)."""
    images, targets, offsets, cases = [], [], [], []
    for task in tasks:
        near = int(rng.binomial(batch, task1_tumour_fraction)) if task == 0 and task1_tumour_fraction > 0 else 0
        for stream, count in ((task, batch - near), (1, near)):
            if count == 0:
                continue
            x, y, off, index = sample_patches(data, stream, count, rng, with_offsets=True,
                                              case_probabilities=case_probabilities, with_cases=True,
                                              patch_size=patch_size)
            images.append(torch.as_tensor(x))
            targets.append(torch.as_tensor(y))
            offsets.append(off)
            cases.append(index)
    x = torch.cat(images).to(device, torch.float32, non_blocking=True)
    y = torch.cat(targets).to(device, torch.long, non_blocking=True)
    # Active tasks are always (0,), (0, 1) or (0, 1, 2), so a patch's stream is its block number.
    origin = torch.arange(len(tasks), device=device).repeat_interleave(batch)
    offsets = torch.cat([torch.as_tensor(o) for o in offsets]).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d), y, origin, offsets, np.concatenate(cases)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=2.0, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------- ensemble


def train_ensemble(cfg: TrainConfig, cases: Path | Sequence[CaseHandle], out_dir: Path,
                   only_fold: int | Sequence[int] | None = None, data_description: dict[str, Any] | None = None,
                   progress: bool = True, cache_dir: Path | None = None, time_limit: float | None = None,
                   prepare_workers: int = 0, recoding: TruthRecoding | None = None) -> dict[str, Any]:
    """Train every fold (or only the fold(s) ``only_fold``) and (re)write ``out_dir`` as a weights folder for `predict`.

    ``cases`` is a BraTS training folder (its truths re-coded by ``recoding`` as they are read) or a list of
    case handles (e.g. `phantom_cases`). With a ``cache_dir`` and ``prepare_workers`` > 1, every case is
    prepared in that many processes first."""
    if isinstance(cases, (str, Path)):
        data_description = data_description or {"path": str(cases)}
    cases = training_handles(cases, recoding, cfg.bias_correction)
    by_id = {c.case_id: c for c in cases}
    splits = split_folds(list(by_id), cfg.folds, cfg.seed)
    if only_fold is None:
        fold_numbers: Sequence[int] = range(cfg.folds)
    else:
        fold_numbers = [only_fold] if isinstance(only_fold, int) else list(only_fold)
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:  # --device cuda on a machine without CUDA: a setup error, not a crash
        raise TrainingSetupError(f"--device {cfg.device}: {err}") from err
    training_autocast(cfg.precision, device)
    if cfg.compile:
        check_compile(cfg, device)
    if not poolable(cfg.patch_size):
        raise TrainingSetupError(f"--patch-size {','.join(map(str, cfg.patch_size))}: every side must be a "
                                 f"positive multiple of {DIVISOR} (the network pools three times)")
    if not -1 <= cfg.average_from < cfg.total_steps:
        raise TrainingSetupError(f"--average-from {cfg.average_from}: must be -1 (off) or a step in "
                                 f"0..{cfg.total_steps - 1}")
    for fold in fold_numbers:  # checked before any preparation: a bad fold stops the run at once, not hours in
        if not 0 <= fold < cfg.folds:
            raise TrainingSetupError(f"--fold {fold} outside 0..{cfg.folds - 1}")
        if cfg.init_from:
            starting_point(cfg.init_from, fold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cache_dir is not None and prepare_workers > 1:
        prepare_all(list(by_id.values()), cache_dir, prepare_workers)
    prepared = PreparedCases(device, len(by_id), cache_dir)  # kept from one fold to the next
    for fold in fold_numbers:
        held_out = splits[fold]
        val_ids = held_out[: cfg.val_cases] if cfg.val_cases else held_out
        train_ids = [i for k, s in enumerate(splits) if k != fold for i in s]
        result = train_fold(cfg, [by_id[i] for i in train_ids], [by_id[i] for i in val_ids],
                            out_dir / "runs" / f"fold_{fold}", fold, progress, cache_dir, time_limit, prepared)
        _publish_fold(out_dir, fold, result)
    description = {"cases": len(by_id), **(data_description or {})}
    return write_ensemble_manifest(out_dir, cfg, description)


def _publish_fold(out_dir: Path, fold: int, result: FoldResult) -> None:
    """The fold's weights for `predict`: its weight average when one was kept, else its best snapshot."""
    run = out_dir / "runs" / f"fold_{fold}"
    source = run / ("average.safetensors" if result.averaged_steps else "best.safetensors")
    target = out_dir / f"fold_{fold}.safetensors"
    save_state(compact_state(load_file(str(source))), target, metadata={"fold": str(fold)})
    write_json_atomic(asdict(result), run / "result.json")


# Largest magnitude float16 holds with margin; tensors beyond it stay float32.
_FP16_LIMIT = 6.0e4


def compact_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors as float16 for the published weights (half the size; loading casts back to the
    model's float32, and the ensemble's masks are unaffected beyond rounding)."""
    return {k: v.half() if v.is_floating_point() and v.abs().max() < _FP16_LIMIT else v for k, v in state.items()}


def write_ensemble_manifest(out_dir: Path, cfg: TrainConfig, data: dict[str, Any]) -> dict[str, Any]:
    """Manifest over every finished fold in ``out_dir`` (folds trained as separate jobs are merged)."""
    folds = []
    results = out_dir.glob("runs/fold_*/result.json")
    for result_path in sorted(results, key=lambda p: int(p.parent.name.removeprefix("fold_"))):
        result = json.loads(result_path.read_text())
        file = f"fold_{result['fold']}.safetensors"
        if (out_dir / file).is_file():
            own = result.get("config", {})
            folds.append({"fold": result["fold"], "file": file, "best_step": result["best_step"],
                          "steps": result["steps"], "augment": own.get("augment", cfg.augment),
                          "augment_acquisition": own.get("augment_acquisition", 0.0),
                          "augment_tumour_contrast": own.get("augment_tumour_contrast", 0.0),
                          "precision": own.get("precision", Precision.AUTO.value),
                          "validation_dice": result["best_dice"], "validation_cases": result["val_cases"],
                          **_published(result), **_started(result)})
    extra = {"training": {"config": _jsonable(asdict(cfg)), "data": data}}
    return write_manifest(out_dir, cfg.variant, cfg.width, folds, extra)


def _published(result: dict[str, Any]) -> dict[str, Any]:
    """Which weights a fold's file holds, for its manifest row."""
    if not result.get("averaged_steps"):
        return {"published": "best"}
    return {"published": "average", "averaged_steps": result["averaged_steps"],
            "average_validation_dice": result.get("average_dice", {})}


def _started(result: dict[str, Any]) -> dict[str, Any]:
    """Where a fold trained with `--init-from` started, for its manifest row (nothing for a random start)."""
    return {"initialised_from": result["initialised_from"]} if result.get("initialised_from") else {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    return value

