"""Preprocessing shared by prediction and training: the brain mask, the crop around it, z-scores.

BraTS images are skull-stripped, so the brain is every voxel that is nonzero in any modality; outside it
the normalised image is 0, which is also what the network sees beyond the crop (zero padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from scipy import ndimage

from .case_warnings import CaseWarning, WarningCode
from .conventions import BRATS_DIRECTION
from .errors import one_line

if TYPE_CHECKING:
    import torch

Volume = TypeVar("Volume", np.ndarray, "torch.Tensor")

# Prediction keeps this many voxels of background around the brain's bounding box: the fast tiling reads
# them as context for the brain's edge (docs/ALGORITHM.md, Inference).
CROP_MARGIN = 4
# Training crops closer: its prepared arrays are padded by half a patch of zeros afterwards, which is the
# context an edge patch needs, so a wider margin would only store more background in every cached case.
TRAINING_CROP_MARGIN = 2
# A modality skull-stripped on its own, or acquired over fewer slices, is zero over part of the brain the others
# cover. Z-scored with the rest, those zeros read as tissue darker than any, and rims of 1-3 voxels cost a case
# its enhancing tumour (EXPERIMENTS round 62). Such a gap is zero in one piece with the background outside the
# brain; zeros the modality's own tissue encloses (a ventricle's CSF stored as 0 on a FLAIR) are its values. Where
# a modality's gap holds more than this share of the brain, it is z-scored over the rest and read as average
# (z = 0) in the gap. Below it nothing changes (our phantoms hold 0.02% of zeros inside the brain at most).
MAX_UNCOVERED_SHARE = 0.01


@dataclass
class BrainCrop:
    """A raw case cut down to its brain: ``image`` is the normalised (C, d, h, w) crop at ``box`` of the
    volume, ``mask`` the brain over that crop."""

    box: tuple[slice, ...]
    image: np.ndarray
    mask: np.ndarray


def brain_mask(image: Volume) -> Volume:
    """Voxels inside the skull-stripped brain: nonzero in any modality (channels first). A numpy array or a
    torch tensor, returned as the same kind: test-time scaling resamples the brain of a crop on the device."""
    return (image != 0).any(0)


def normalise(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score each modality inside the brain (`zscore`); outside-brain voxels stay 0."""
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W) image, got shape {image.shape}")
    mask = brain_mask(image) if mask is None else mask
    out = np.zeros(image.shape, np.float32)
    if not mask.any():
        return out
    for c in range(image.shape[0]):
        out[c] = zscore(image[c], mask)
    return out


def zscore(channel: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """One (D, H, W) modality z-scored inside ``brain`` (0 outside), by its statistics over the brain less its
    `uncovered` gap, where it reads 0 (average): what `normalise` gives each modality, and post-processing's
    enhancement check reads."""
    gap = uncovered(channel, brain)
    scored = brain if gap is None else brain & ~gap
    mean, std = zscore_parameters(channel[scored])
    out = np.zeros(channel.shape, np.float32)
    out[scored] = ((channel[scored].astype(np.float64) - mean) / std).astype(np.float32)
    return out


def uncovered(channel: np.ndarray, brain: np.ndarray) -> np.ndarray | None:
    """The gap of a (D, H, W) modality: its zeros inside ``brain`` that are one piece (6-connected) with its
    zeros outside the brain or on the volume's faces, when they hold over `MAX_UNCOVERED_SHARE` of the brain
    (a rim or slab it does not cover); None otherwise, and always when few of its brain voxels are zero."""
    limit = MAX_UNCOVERED_SHARE * np.count_nonzero(brain)
    zero = channel == 0
    if np.count_nonzero(zero & brain) <= limit:
        return None
    gap = brain & connected_to(zero, ~brain | face_mask(zero.shape))
    return gap if np.count_nonzero(gap) > limit else None


def connected_to(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The voxels of a (D, H, W) ``mask`` in pieces (6-connected) that hold a voxel of ``seeds``."""
    pieces, count = ndimage.label(mask)
    reached = np.zeros(count + 1, bool)
    reached[pieces[seeds]] = True
    reached[0] = False  # voxels outside the mask
    return reached[pieces]


def face_mask(shape: tuple[int, ...]) -> np.ndarray:
    """The voxels on the six faces of a (D, H, W) volume."""
    faces = np.zeros(shape, bool)
    for face in volume_faces(faces):
        face[...] = True
    return faces


def volume_faces(array: np.ndarray) -> list[np.ndarray]:
    """The six faces of an array's last three axes (D, H, W), leading axes kept: edges and corners appear
    once per face they lie on."""
    return ([array[..., i, :, :] for i in (0, -1)] + [array[..., :, i, :] for i in (0, -1)]
            + [array[..., i] for i in (0, -1)])


def zscore_parameters(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (1 where it is 0) of a modality's brain ``values``, in float64 (0 and 1
    for none)."""
    if values.size == 0:
        return 0.0, 1.0
    std = float(values.std(dtype=np.float64))
    return float(values.mean(dtype=np.float64)), std if std > 0 else 1.0


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Tight box around ``mask`` grown by ``margin`` voxels (clipped to the volume)."""
    if not mask.any():
        raise ValueError("cannot take the bounding box of an empty mask")
    coords = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax))) for ax in range(mask.ndim)]
    return tuple(slice(max(int(c[0]) - margin, 0), min(int(c[-1]) + 1 + margin, n)) for c, n in zip(coords, mask.shape))


def clipped_margin(mask: np.ndarray, margin: int) -> tuple[tuple[int, int], ...]:
    """The voxels, before and after per axis, that the volume's faces take off ``bounding_box(mask,
    margin)``'s margin: 0 where the mask lies ``margin`` or more voxels inside the volume."""
    tight = bounding_box(mask)
    return tuple((max(margin - s.start, 0), max(margin - (n - s.stop), 0)) for s, n in zip(tight, mask.shape))


def crop_to_brain(image: np.ndarray, margin: int = CROP_MARGIN) -> BrainCrop | None:
    """The normalised crop of a raw (C, D, H, W) case around its brain; None when the brain is empty."""
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W) image, got shape {image.shape}")
    mask = brain_mask(image)
    if not mask.any():
        return None
    box = bounding_box(mask, margin)
    return BrainCrop(box, normalise(image[(slice(None), *box)], mask[box]), mask[box])


# The network learnt BraTS's grid: 1 mm voxels. Along an axis whose voxels are coarser (thick slices), a case
# is resampled to about 1 mm over the same field of view, segmented there (post-processing's voxel counts
# then count voxels of that grid) and its labels brought back (`Regrid`): 3 mm slices read as they were
# lost WT (0.77 against 0.83 on 1 mm). By default finer axes are kept as they are: on this project's
# phantoms shrinking them to 1 mm cost Dice (0.7 mm voxels: WT 0.90 read as they were, 0.86 shrunk; 0.5 x
# 0.5 x 1 mm, 0.91 against 0.84), on the second generator's at 0.8 mm the two were level. `finer=True`
# shrinks them too (nnU-Net's way), so that post-processing's voxel counts mean about 1 mm³ each again.
# Within this share of 1 mm an axis counts as 1 mm.
NETWORK_SPACING_MM = 1.0
SPACING_TOLERANCE = 0.05
# A working grid larger than this along an axis (a 512 mm field of view) means a spacing in the header
# that cannot be the brain's: refused rather than resampled into a volume that does not fit in memory.
MAX_WORKING_SIDE = 512


@dataclass(frozen=True)
class Regrid:
    """Between a case's own grid (``native`` voxels, ``spacing`` mm, array order z, y, x) and the grid the
    network reads it on (``working``): about 1 mm along the axes whose voxels are coarser (and, if asked,
    finer) than 1 mm, the case's own voxels along the others, over the same field of view. Voxel centres
    keep their physical places (trilinear resampling with align_corners=False): the working grid's voxels
    are ``native * spacing / working`` mm."""

    native: tuple[int, ...]
    spacing: tuple[float, ...]
    working: tuple[int, ...]

    @classmethod
    def for_case(cls, shape: tuple[int, ...], spacing: tuple[float, ...], finer: bool = False) -> Regrid | None:
        """The regrid a case of ``shape`` voxels of ``spacing`` mm needs, or None when no axis is coarser
        than 1 mm (or, with ``finer``, finer) by more than SPACING_TOLERANCE. Raises ValueError for a
        working grid over MAX_WORKING_SIDE voxels."""
        if len(shape) != len(spacing) or min(spacing) <= 0:
            raise ValueError(f"bad grid: {shape} voxels of {spacing} mm")
        moved = [s > NETWORK_SPACING_MM * (1 + SPACING_TOLERANCE)
                 or (finer and s < NETWORK_SPACING_MM * (1 - SPACING_TOLERANCE)) for s in spacing]
        if not any(moved):
            return None
        working = tuple(max(1, round(n * s / NETWORK_SPACING_MM)) if m else n
                        for n, s, m in zip(shape, spacing, moved))
        if max(w for w, m in zip(working, moved) if m) > MAX_WORKING_SIDE:
            raise ValueError(f"{_xyz(shape, 'd')} voxels of {_xyz(spacing)} mm span {_xyz(working, 'd')} mm: a "
                             f"field of view over {MAX_WORKING_SIDE} mm is not a brain's (is the header's spacing "
                             "right?)")
        return cls(tuple(shape), tuple(spacing), working)

    @property
    def working_spacing(self) -> tuple[float, ...]:
        return tuple(n * s / m for n, s, m in zip(self.native, self.spacing, self.working))

    def describe(self) -> str:
        return (f"voxels of {_xyz(self.spacing)} mm: segmented on a grid of "
                f"{_xyz(self.working_spacing)} mm and resampled back")

    def to_working(self, image: np.ndarray) -> np.ndarray:
        """A raw (C, D, H, W) case on the working grid. The brain is resampled as a mask and each modality
        divided by it, so that voxels at the brain's edge are not darkened by the background's zeros, and
        everything outside the resampled brain is 0, as in a skull-stripped case."""
        brain = _resample(brain_mask(image)[None], self.working)[0]
        inside = brain > 0.5
        out = _resample(image, self.working)
        out /= np.where(inside, brain, 1.0)[None]
        out *= inside[None]
        return out

    def labels_to_native(self, labels: np.ndarray) -> np.ndarray:
        """An integer label map on the working grid brought back to the case's grid: each label's mask
        resampled trilinearly, and every voxel given the label of highest weight (nnU-Net's way; nearest
        neighbour would step where the native grid is finer)."""
        best = np.zeros(self.native, np.float32)
        out = np.zeros(self.native, labels.dtype)
        for value in np.unique(labels):
            weight = _resample((labels == value)[None], self.native)[0]
            higher = weight > best
            out[higher], best[higher] = value, weight[higher]
        return out

    def volume_to_native(self, volume: np.ndarray) -> np.ndarray:
        """A float (C, d, h, w) volume on the working grid (probabilities) on the case's grid, trilinearly."""
        return _resample(volume, self.native)


@dataclass(frozen=True)
class Reorientation:
    """Between a case's own array (axes z, y, x as SimpleITK gives them) and the same voxels stored as BraTS
    stores a brain (`BRATS_DIRECTION`): an axis permutation and flips, exact both ways. A case stored in
    another axis order (sagittal or coronal slices first, a permuted header) would show the networks a brain
    on its side; flips they learnt from augmentation, axis orders they did not."""

    axes: tuple[int, int, int]  # working array axis k holds the case's array axis axes[k]
    flips: tuple[bool, bool, bool]  # per working axis, after the permutation

    @classmethod
    def for_direction(cls, direction: Sequence[float]) -> Reorientation | None:
        """The reorientation a case with this (row-major 3x3) direction matrix needs, or None when it is
        stored as BraTS stores it or no axis order fits it (an obliquity near 45 degrees: read as it is)."""
        matrix, target = np.asarray(direction, float).reshape(3, 3), np.asarray(BRATS_DIRECTION).reshape(3, 3)
        physical = np.abs(matrix).argmax(axis=0)  # the physical axis each index axis (x, y, z) runs along
        if sorted(physical) != [0, 1, 2]:
            return None
        source = [int(np.flatnonzero(physical == k)[0]) for k in range(3)]  # index axis along physical k
        flips = [bool(np.sign(matrix[k, j]) != np.sign(target[k, k])) for k, j in enumerate(source)]
        # Array axes run z, y, x: index axis j is array axis 2 - j.
        axes = tuple(2 - source[2 - a] for a in range(3))
        flips_by_array_axis = tuple(flips[2 - a] for a in range(3))
        if axes == (0, 1, 2) and not any(flips_by_array_axis):
            return None
        return cls(axes, flips_by_array_axis)  # type: ignore[arg-type]

    def describe(self) -> str:
        return "stored in another orientation than BraTS's: segmented in BraTS's, its labels turned back"

    def permute(self, values: Sequence) -> tuple:
        """Per-axis values of the case's array (voxel sizes, the shape) in the working array's axis order."""
        return tuple(values[a] for a in self.axes)

    def to_working(self, array: np.ndarray) -> np.ndarray:
        """A case's (..., D, H, W) array as BraTS stores it."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + a for a in self.axes)))
        flipped = tuple(lead + a for a in range(3) if self.flips[a])
        return np.ascontiguousarray(np.flip(out, flipped) if flipped else out)

    def to_native(self, array: np.ndarray) -> np.ndarray:
        """A (..., D, H, W) array on the working axes back in the case's own storage."""
        lead = array.ndim - 3
        flipped = tuple(lead + a for a in range(3) if self.flips[a])
        out = np.flip(array, flipped) if flipped else array
        inverse = np.argsort(self.axes)
        return np.ascontiguousarray(np.transpose(out, (*range(lead), *(lead + int(a) for a in inverse))))


@dataclass(frozen=True)
class WorkingGrid:
    """A case's way onto the array the networks read and back: first `Reorientation` (BraTS's storage), then
    `Regrid` (about 1 mm), each None where the case needs none."""

    reorientation: Reorientation | None
    regrid: Regrid | None
    spacing: tuple[float, ...]  # the working array's voxel sizes, array order

    @classmethod
    def for_case(cls, shape: tuple[int, ...], spacing: tuple[float, ...], direction: Sequence[float],
                 resample: bool = True, finer: bool = False) -> WorkingGrid:
        """The working grid of a case of ``shape`` voxels of ``spacing`` mm (array order) with this direction
        matrix; ``resample`` and ``finer`` as `Regrid.for_case` reads them (ValueError as it raises)."""
        reorientation = Reorientation.for_direction(direction)
        if reorientation is not None:
            shape, spacing = reorientation.permute(shape), reorientation.permute(spacing)
        regrid = Regrid.for_case(shape, spacing, finer) if resample else None
        return cls(reorientation, regrid, tuple(spacing) if regrid is None else regrid.working_spacing)

    @property
    def native(self) -> bool:
        """Whether the networks read the case's own array."""
        return self.reorientation is None and self.regrid is None

    def notes(self) -> list[CaseWarning]:
        """What the case's labels went through on the way: informational, they come back on its grid."""
        steps = ((WarningCode.REORIENTED, self.reorientation), (WarningCode.RESAMPLED, self.regrid))
        return [CaseWarning(code, step.describe()) for code, step in steps if step is not None]

    def working_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The working array's shape (D, H, W) for the case's."""
        if self.regrid is not None:
            return self.regrid.working
        return self.reorientation.permute(shape) if self.reorientation else tuple(shape)

    def to_working(self, image: np.ndarray) -> np.ndarray:
        """A raw (C, D, H, W) case on the working grid."""
        image = image if self.reorientation is None else self.reorientation.to_working(image)
        return image if self.regrid is None else self.regrid.to_working(image)

    def labels_to_native(self, labels: np.ndarray) -> np.ndarray:
        labels = labels if self.regrid is None else self.regrid.labels_to_native(labels)
        return labels if self.reorientation is None else self.reorientation.to_native(labels)

    def volume_to_native(self, volume: np.ndarray) -> np.ndarray:
        """A float (C, d, h, w) volume on the working grid (probabilities) on the case's."""
        volume = volume if self.regrid is None else self.regrid.volume_to_native(volume)
        return volume if self.reorientation is None else self.reorientation.to_native(volume)


def _xyz(values: tuple, spec: str = ".2f") -> str:
    """Array-order (z, y, x) ``values`` as "XxYxZ", the order image headers print."""
    return "x".join(format(v, spec) for v in reversed(values))


def resample(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A (C, D, H, W) or (D, H, W) tensor resampled trilinearly to spatial ``shape`` (voxel centres kept
    at their physical places: align_corners=False)."""
    import torch.nn.functional as F

    batch = volume[None, None] if volume.ndim == 3 else volume[None]
    out = F.interpolate(batch.float(), size=tuple(shape), mode="trilinear", align_corners=False)[0]
    return out[0] if volume.ndim == 3 else out


def _resample(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`resample` for a (C, D, H, W) numpy array of any numeric or bool type, a channel at a time, each
    channel converted to float32 as it goes (so a caller need not copy the whole array first)."""
    import torch

    out = np.empty((volume.shape[0], *shape), np.float32)
    for c in range(volume.shape[0]):
        out[c] = resample(torch.from_numpy(np.ascontiguousarray(volume[c], np.float32)), shape).numpy()
    return out


# N4 settings: fitted on a copy shrunk by up to 8 per axis (a 1 mm brain becomes ~20x25x20 voxels, enough
# for a field this smooth), four fitting levels of 50 iterations (the B-spline grid doubles per level; with
# three, a field of log-std 0.44 on a phantom kept 85% of its spread, with four under 30%).
N4_MAX_SHRINK = 8
N4_MIN_SHRUNK_SIDE = 16
N4_ITERATIONS = (50, 50, 50, 50)
# Fewer positive brain voxels outside the tumour than this and a modality is left uncorrected.
N4_MIN_FIT_VOXELS = 1000
# N4's fit depends on how many threads ITK splits it into (on a phantom the fields of 1, 2, 4 and 16 threads
# differed by up to 0.6%), which made a case's labels depend on the machine's core count. So every fit runs
# single-threaded, and the modalities are fitted concurrently instead (SimpleITK releases the GIL): the same
# fields whatever the machine or the number of workers, and on 2 cores as fast (the four fits 1.98 s against
# 2.17 s one after another on ITK's two threads).
N4_MAX_WORKERS = 4
# Images normalised before they reach us (z-scores: about half of the brain negative) leave N4, which fits log
# intensities, only their positive half to fit and correct, and that bends them: on a second-generator phantom
# WT fell from 0.805 to 0.714 (0.735 with no correction at all; EXPERIMENTS round 62). A modality with more
# than this share of its brain voxels negative is first lifted to positive inside the brain, its lowest voxel to
# `N4_LIFT_FLOOR` of its range; the networks z-score every modality, so the lift changes nothing else.
# (Raw MR magnitude images are not negative; a resampled one may ring slightly below 0 at edges, far below this
# share, and those voxels are left as they are.)
NORMALISED_NEGATIVE_SHARE = 0.01
N4_LIFT_FLOOR = 0.01


@dataclass
class BiasCorrected:
    """``image`` with each modality divided by its estimated bias field; ``warnings`` name the modalities
    left as they were (N4 failed on them); ``seconds``: what preparing it took, where its caller measures."""

    image: np.ndarray
    warnings: list[CaseWarning]
    seconds: float = 0.0


def n4_shrink_factor(shape: tuple[int, ...]) -> int:
    """The largest shrink (<= N4_MAX_SHRINK) that leaves every side at least N4_MIN_SHRUNK_SIDE voxels."""
    return max(1, min(N4_MAX_SHRINK, min(shape) // N4_MIN_SHRUNK_SIDE))


def n4_bias_field(channel: np.ndarray, mask: np.ndarray,
                  pad: tuple[tuple[int, int], ...] = ((0, 0),) * 3) -> np.ndarray:
    """The multiplicative bias field N4 estimates for one (D, H, W) modality over ``mask`` (positive
    voxels only: N4 works on log intensities), at full resolution. ``pad`` (voxels before and after, per
    axis) surrounds the channel with zeros outside the mask for the fit, and is cut off the field."""
    import SimpleITK as sitk  # imported here: training, which shares this module, runs where it is absent

    # Process-wide: N4's inner filters take SimpleITK's default, not the filter's own thread count.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    padded = np.pad(channel.astype(np.float32), pad)
    image = sitk.GetImageFromArray(padded)
    shrink = [n4_shrink_factor(padded.shape)] * 3
    small = sitk.Shrink(image, shrink)
    small_mask = sitk.Shrink(sitk.GetImageFromArray(np.pad(mask, pad).astype(np.uint8)), shrink)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    n4.Execute(small, small_mask)
    field = np.exp(sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image))).astype(np.float32)
    return field[tuple(slice(before, before + n) for (before, _), n in zip(pad, channel.shape))]


def correct_bias(image: np.ndarray, names: list[str] | None = None, exclude: np.ndarray | None = None,
                 workers: int = 1) -> BiasCorrected:
    """N4 bias correction of a raw (C, D, H, W) case, each modality on its own, fitted inside the brain but
    outside ``exclude`` (the tumour, which a fine field would otherwise flatten as if it were bias) and
    applied to the whole brain; voxels outside the brain and non-positive voxels keep their values. A
    modality N4 cannot fit (too few positive voxels to fit on, an ITK error) is left as it is, with a
    warning naming it (``names``: the modalities' names, in channel order). ``workers`` modalities are
    fitted at a time (at most N4_MAX_WORKERS); the result does not depend on it."""
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W) image, got shape {image.shape}")
    if exclude is not None and exclude.shape != image.shape[1:]:
        raise ValueError(f"exclude mask {exclude.shape} and image {image.shape[1:]} differ in shape")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    names = names or [f"channel {c}" for c in range(image.shape[0])]
    if len(names) != image.shape[0]:
        raise ValueError(f"{len(names)} modality names for {image.shape[0]} channels")
    out = image.astype(np.float32, copy=True)
    brain = brain_mask(image)
    if not brain.any():
        return BiasCorrected(out, [])
    # N4's shrunk grid, and with it the field, starts at the box's corner. Where a face of the volume clips the
    # box's margin (a case stored cut to its brain; a brain that reaches the lowest slice) the fit pads the box
    # with zeros outside its mask instead, so a brain gets the same field whatever background is stored around
    # it (cut to its brain, one case's ET went 0.86 -> 0.64 before; EXPERIMENTS rounds 63-64).
    box, pad = bounding_box(brain, TRAINING_CROP_MARGIN), clipped_margin(brain, TRAINING_CROP_MARGIN)
    for c in range(image.shape[0]):
        _lift_if_normalised(out[c][box], brain[box])
    kept = brain[box] if exclude is None else brain[box] & ~exclude[box]
    positive = [brain[box] & (out[c][box] > 0) for c in range(image.shape[0])]
    fitted = [c for c in range(image.shape[0]) if (positive[c] & kept).sum() >= N4_MIN_FIT_VOXELS]
    with ThreadPoolExecutor(max(1, min(workers, N4_MAX_WORKERS, len(fitted)))) as pool:
        fields = {c: pool.submit(n4_bias_field, out[c][box], positive[c] & kept, pad) for c in fitted}
    warnings = []
    for c in range(image.shape[0]):
        if c not in fields:
            warnings.append(CaseWarning(WarningCode.BIAS_CORRECTION_SKIPPED,
                                        f"bias correction skipped for {names[c]}: fewer than {N4_MIN_FIT_VOXELS} "
                                        "positive brain voxels outside the tumour"))
            continue
        try:
            field = fields[c].result()
        except RuntimeError as err:
            warnings.append(CaseWarning(WarningCode.BIAS_CORRECTION_FAILED,
                                        f"bias correction failed for {names[c]} ({one_line(err)[:120]}); "
                                        "used as it is"))
            continue
        channel = out[c][box]
        out[c][box] = np.where(positive[c], channel / field, channel)
    return BiasCorrected(out, warnings)


def _lift_if_normalised(channel: np.ndarray, brain: np.ndarray) -> None:
    """Lift one modality's nonzero brain voxels, in place, so that its lowest is `N4_LIFT_FLOOR` of its range,
    when over `NORMALISED_NEGATIVE_SHARE` of them are negative (an image normalised before it reached us)."""
    own = brain & (channel != 0)  # where it is zero the modality does not cover the brain: it stays 0
    values = channel[own]
    if values.size == 0 or np.count_nonzero(values < 0) <= NORMALISED_NEGATIVE_SHARE * values.size:
        return
    low, high = float(values.min()), float(values.max())
    channel[own] = values - low + (N4_LIFT_FLOOR * (high - low) or 1.0)  # 1.0: a constant negative channel


def enclosed_in_a_slice(mask: np.ndarray) -> np.ndarray:
    """Voxels outside ``mask`` that it encloses within at least one slice along some axis (2D holes).

    Slices rather than 3D: a necrotic centre is often open to the outside through a gap of a voxel or two
    somewhere on its surface, and a 3D fill then finds nothing (held-out phantoms: 3D filled 4% of what the
    slice-wise fill did)."""
    enclosed = np.zeros(mask.shape, bool)
    if not mask.any():
        return enclosed
    # A hole lies inside its mask's bounding box: filling only there gives the same voxels, in a fraction
    # of the time for a tumour-sized mask in a whole-brain volume.
    box = bounding_box(mask)
    inner = mask[box]
    filled = np.zeros(inner.shape, bool)
    for axis in range(mask.ndim):
        structure = np.zeros((3,) * mask.ndim, bool)
        plane = [slice(None)] * mask.ndim
        plane[axis] = 1
        structure[tuple(plane)] = ndimage.generate_binary_structure(mask.ndim - 1, 1)  # in-plane only
        filled |= ndimage.binary_fill_holes(inner, structure=structure)
    enclosed[box] = filled & ~inner
    return enclosed
