"""BraTS-like phantom cases: anatomy, tumour sub-regions and SynthSeg-style randomised MRI contrasts.

No BraTS data can be downloaded where this project is built, so training, tests and demonstrations use
these phantoms. Each case is deterministic for (seed, index, ranges).

Generator 2 spans the appearance of real brains rather than one template: a folded cortex whose sulcal depth
and thickness vary, holding 40-55% of the parenchyma in the training ranges and 33-65% in the wide ones
(adult brains 40-60%; generator 2.1 left it free and made 20-86%), deep grey nuclei, ventricles from slit
to enlarged, atrophy (wider sulci), patchy tissue texture, partial-volume blur, bias fields up to about +-45%, noise,
thick-slice acquisitions along any axis, intensity scale and stored dtype. Tumours sit anywhere in the
parenchyma (touching the cortex and the ventricles), tiny to huge, sometimes multifocal, sometimes without
ET or without NCR. Tissue means are drawn relative to white matter with wide, overlapping ranges: only the
contrasts MRI fixes are kept (edema brighter than white matter on FLAIR and T2 and brighter than grey matter
on T2, ET brighter on T1c, NCR darker on T1c, CSF bright on T2 and dark on FLAIR), so grey matter can be as
bright as edema on FLAIR and a model must read the four modalities together and the shape; a share of cases
with a cortex as bright as edema on FLAIR, which these ranges almost never draw, is an option
(`PhantomMix.bright_cortex`, `--bright-cortex`), as is a share of tumours without ET whose core is as bright
as or brighter than their edema on FLAIR and T2, a non-enhancing tumour's solid part
(`PhantomMix.bright_core`, `--bright-core`).
`PhantomRanges` holds every range, so held-out series can be drawn outside the training ranges:
`WIDE_RANGES` stretches them all at once (`python -m app phantoms --ranges wide`), benchmarks/ood_sweep.py
one factor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .conventions import (
    BRATS_DIRECTION,
    EDEMA,
    ENHANCING,
    NECROSIS,
    LabelConvention,
    Layout,
    Modality,
    to_file_labels,
)
from .options import MIN_PHANTOM_SIDE, PhantomPreset

GENERATOR_VERSION = "2.2"
DEFAULT_SIZE = (240, 240, 155)  # x, y, z as BraTS stores it (1 mm isotropic)
# BraTS volumes have this origin (and `BRATS_DIRECTION`) once read by SimpleITK.
BRATS_ORIGIN = (-0.0, -239.0, 0.0)

# Tissue codes used only inside the generator.
_BG, _WM, _GM, _CSF, _NCR, _ED, _ET, _DGM = range(8)
WHITE_MATTER, GREY_MATTER, CSF, DEEP_GREY = _WM, _GM, _CSF, _DGM
_TISSUES = (_WM, _GM, _CSF, _NCR, _ED, _ET, _DGM)
Range = tuple[float, float]

# Tissue means as multiples of white matter's mean, per modality (drawn uniformly). Deep grey matter is
# drawn between white and grey matter. The ranges overlap where real scanners overlap (grey matter and
# edema on FLAIR); they keep the signs MRI fixes.
_RELATIVE_CONTRAST: dict[Modality, dict[int, Range]] = {
    Modality.FLAIR: {_GM: (1.05, 1.55), _CSF: (0.05, 0.45), _NCR: (0.7, 2.0), _ED: (1.3, 2.4), _ET: (1.1, 2.2)},
    Modality.T1: {_GM: (0.6, 0.9), _CSF: (0.1, 0.45), _NCR: (0.2, 0.75), _ED: (0.55, 0.92), _ET: (0.6, 1.05)},
    Modality.T1C: {_GM: (0.6, 0.92), _CSF: (0.1, 0.45), _NCR: (0.15, 0.75), _ED: (0.55, 0.95), _ET: (1.35, 2.6)},
    Modality.T2: {_GM: (1.15, 1.7), _CSF: (2.0, 4.0), _NCR: (1.6, 3.6), _ED: (1.5, 3.0), _ET: (1.1, 2.4)},
}
# Edema's water has a longer T2 than grey matter's on every scanner, so on T2 edema is drawn at least this
# multiple of the case's grey matter (generator 2.0 let the two ranges overlap, and wide-range edema could be
# darker than the cortex on T2: a case no scanner produces).
_EDEMA_OVER_GREY_MATTER = {Modality.T2: 1.2}
_FILE_TOKENS = {
    Layout.BRATS2023: {Modality.FLAIR: "t2f", Modality.T1: "t1n", Modality.T1C: "t1c", Modality.T2: "t2w"},
    Layout.BRATS2018: {Modality.FLAIR: "flair", Modality.T1: "t1", Modality.T1C: "t1ce", Modality.T2: "t2"},
    Layout.TOOLKIT: {Modality.FLAIR: "flair", Modality.T1: "t1", Modality.T1C: "t1c", Modality.T2: "t2"},
}
_STORED_DTYPES = (np.int16, np.uint16, np.float32, np.int32)


@dataclass(frozen=True)
class PhantomRanges:
    """Every randomised property of a phantom, as (low, high) ranges drawn uniformly per case.

    The defaults are the training distribution; `benchmarks/ood_sweep.py` moves single ranges outside it.
    Lengths are in mm at the BraTS size and scale with smaller phantoms.
    """

    cortex_thickness: Range = (2.5, 5.5)
    # The cortex's share of the parenchyma (cortex / (white + cortical grey + deep grey matter)) is held in
    # this range: adult brains give 40-60%. A drawn thickness and folding that would leave it (generator 2.1
    # made 20-86%) are kept in shape, the cortex only thinned or thickened to the nearer bound.
    grey_matter_share: Range = (0.40, 0.55)
    sulcal_depth: Range = (10.0, 25.0)  # how far sulci (lined with cortex) reach into the white matter
    fold_frequency: Range = (18.0, 32.0)  # smooth-field cells across the brain: more = finer gyri
    sulcal_csf: Range = (0.3, 1.6)  # half-width of the CSF in a sulcus (atrophy widens it)
    ventricle_scale: Range = (0.45, 1.9)  # slit to enlarged
    deep_grey_scale: Range = (0.8, 1.2)
    contrast: dict[Modality, dict[int, Range]] = field(default_factory=lambda: _RELATIVE_CONTRAST)
    texture: Range = (0.01, 0.08)  # patchy intensity variation inside tissues (fraction of the mean)
    blur_sigma: Range = (0.3, 1.1)  # partial-volume blur, voxels
    bias_strength: Range = (0.0, 0.2)  # std of the log bias field (0.2: about +-45% at two std)
    noise: Range = (0.005, 0.06)  # Gaussian noise std, fraction of white matter's mean
    thick_slice_probability: float = 0.3  # per modality: acquired with thick slices along one axis
    thick_slice_factor: Range = (2.0, 5.0)
    tumour_core_radius: Range = (3.0, 22.0)  # mm, main lesion
    edema_extent: Range = (1.1, 2.8)  # edema reach in core radii
    scale: Range = (100.0, 4000.0)  # stored intensity of white matter
    # Cortex as bright as edema on FLAIR, which the contrast ranges above almost never draw (grey matter up
    # to 1.55x white matter, edema from 1.3x) and a second generator's phantoms do (round 42): in each case,
    # with this probability, grey matter's FLAIR mean is redrawn as edema's times `bright_cortex_ratio` and
    # deep grey matter's between white and the new grey matter. 0 in every preset, so every series drawn
    # before it regenerates as it was (the draw deciding it is only made when the probability is above 0).
    bright_cortex_probability: float = 0.0
    bright_cortex_ratio: Range = (0.85, 1.05)
    # The share of cases whose tumours have no ET; independently of it, 10% of all cases are drawn without NCR
    # (a core without ET is NCR/NET whatever that draw).
    non_enhancing_share: float = 0.15
    # A tumour without ET whose core is as bright as or brighter than its edema on FLAIR and brighter on T2 (a
    # low-grade tumour's solid part; the contrast ranges seldom draw both, a second generator's phantoms do:
    # round 45): when on, in each such case the core's FLAIR and T2 means are redrawn as edema's times these.
    # Off in every preset, and its draws are made only when on, so every series drawn before regenerates.
    bright_non_enhancing_core: bool = False
    bright_core_ratio: dict[Modality, Range] = field(
        default_factory=lambda: {Modality.FLAIR: (0.95, 1.4), Modality.T2: (1.0, 1.4)})

    def widened(self, **changes) -> PhantomRanges:
        return replace(self, **changes)


DEFAULT_RANGES = PhantomRanges()
# Grey matter up to this multiple of white matter in WIDE_RANGES: brighter on FLAIR and T2 (issue 13's
# failure: cortex read as edema), closer to white matter on T1 and T1c.
_WIDE_GREY_MATTER_TOP = {Modality.FLAIR: 1.75, Modality.T1: 0.95, Modality.T1C: 0.97, Modality.T2: 1.9}
# Every range of DEFAULT_RANGES that an appearance or an anatomy can leave, stretched beyond it towards
# what other scanners and brains give (the tumour's own ranges stay): uniform draws put about half of each
# such property outside training, so a case mixes several at once, as another site does.
# `benchmarks/ood_sweep.py` moves one factor at a time instead.
WIDE_RANGES = DEFAULT_RANGES.widened(
    cortex_thickness=(2.5, 7.5),
    grey_matter_share=(0.33, 0.65),
    sulcal_depth=(10.0, 30.0),
    fold_frequency=(16.0, 36.0),
    sulcal_csf=(0.3, 2.2),
    ventricle_scale=(0.45, 2.3),
    deep_grey_scale=(0.7, 1.3),
    contrast={m: {**t, _GM: (t[_GM][0], _WIDE_GREY_MATTER_TOP[m])} for m, t in _RELATIVE_CONTRAST.items()},
    texture=(0.01, 0.12),
    blur_sigma=(0.3, 1.6),
    bias_strength=(0.0, 0.35),
    noise=(0.005, 0.1),
    thick_slice_probability=0.5,
    thick_slice_factor=(2.0, 6.5),
    scale=(50.0, 8000.0),
)
RANGE_PRESETS = {PhantomPreset.TRAINING: DEFAULT_RANGES, PhantomPreset.WIDE: WIDE_RANGES}


def preset_of_case(preset: PhantomPreset, index: int) -> PhantomPreset:
    """The preset case ``index`` of a series is drawn from: MIXED alternates TRAINING (even) and WIDE (odd)."""
    if preset is PhantomPreset.MIXED:
        return PhantomPreset.TRAINING if index % 2 == 0 else PhantomPreset.WIDE
    return preset


def check_share(percent: int, what: str) -> None:
    """ValueError unless ``percent``, the share of cases drawn with option ``what``, is a whole percentage
    0-100 (as case IDs carry it)."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"{what} share must be a whole percentage 0-100, got {percent!r}")


# The tag of `PhantomMix.case_id`: which ranges a phantom was drawn from.
_ID_TAGS = {PhantomPreset.TRAINING: "A", PhantomPreset.WIDE: "W"}


@dataclass(frozen=True)
class PhantomMix:
    """What a series draws its cases from: ``preset``'s ranges (MIXED: training and wide by turns), with a
    cortex as bright as edema on FLAIR in ``bright_cortex`` percent of the cases and, when ``bright_core`` is
    above 0, that percentage of cases without ET, each with a core as bright as or brighter than its edema.
    The percentages are whole numbers 0-100 (case IDs carry them), checked here."""

    preset: PhantomPreset = PhantomPreset.TRAINING
    bright_cortex: int = 0
    bright_core: int = 0

    def __post_init__(self) -> None:
        check_share(self.bright_cortex, "bright-cortex")
        check_share(self.bright_core, "bright-core")

    def ranges_of_case(self, index: int) -> PhantomRanges:
        """The ranges case ``index`` is drawn from (the one place that resolves MIXED and the shares)."""
        ranges = RANGE_PRESETS[preset_of_case(self.preset, index)]
        if self.bright_cortex:
            ranges = ranges.widened(bright_cortex_probability=self.bright_cortex / 100)
        if self.bright_core:
            ranges = ranges.widened(non_enhancing_share=self.bright_core / 100, bright_non_enhancing_core=True)
        return ranges

    def case_id(self, layout: Layout, seed: int, index: int) -> str:
        """The case ID of phantom ``index`` of series ``seed``: the tag says which ranges drew it, and a
        bright-cortex or bright-core share other than 0 adds ``C<percent>`` or ``K<percent>``, since the
        option redraws the case; so a prepared-case cache (`train --cache`) or an output folder never mixes
        cases of one seed and index drawn differently."""
        preset = preset_of_case(self.preset, index)
        tag = _ID_TAGS[preset]
        options = (f"C{self.bright_cortex}" if self.bright_cortex else "") + (
            f"K{self.bright_core}" if self.bright_core else "")
        if layout is Layout.BRATS2023:
            return f"BraTS-PH{tag}{options}-{seed:03d}{index:02d}-000"
        return f"Phantom{'' if preset is PhantomPreset.TRAINING else tag}{options}_{seed:03d}_{index:03d}"


# The training ranges, no option: what a series draws unless told otherwise.
DEFAULT_MIX = PhantomMix()


@dataclass
class Phantom:
    """One generated case: images (array order z, y, x) and internal labels 0/1/2/3."""

    case_id: str
    images: dict[Modality, np.ndarray]
    labels: np.ndarray
    tissue: np.ndarray  # generator tissue codes (0 background, 1 WM, 2 GM, 3 CSF, 7 deep GM); not written


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: float) -> np.ndarray:
    """Smooth random field, roughly unit variance: coarse Gaussian noise, cubic-spline upsampled to a
    quarter-resolution grid, then trilinearly to full size (a full-size spline zoom is 20x slower)."""
    coarse = rng.standard_normal([max(2, round(cells * s / max(shape))) + 2 for s in shape])
    quarter = [max(c, -(-s // 4)) for s, c in zip(shape, coarse.shape)]
    mid = ndimage.zoom(coarse, [q / c for q, c in zip(quarter, coarse.shape)], order=3, mode="nearest")
    full = torch.nn.functional.interpolate(
        torch.from_numpy(mid.astype(np.float32))[None, None], size=shape, mode="trilinear", align_corners=True
    )
    out = full[0, 0].numpy()
    return out / max(float(out.std()), 1e-6)


def _ellipsoid_distance(shape, centre, radii) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) on the grid; broadcasted for memory."""
    axes = [(np.arange(n, dtype=np.float32) - c) / r for n, c, r in zip(shape, centre, radii)]
    return np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)


def _u(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(*bounds))


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int], scale: float, ranges: PhantomRanges) -> np.ndarray:
    """Tissue map of a skull-stripped brain: folded cortex lining the brain surface and the sulci, white
    matter inside, sulcal CSF, lateral ventricles and deep grey nuclei."""
    d, h, w = shape
    centre = np.array([d * 0.48, h * 0.5, w * 0.5]) + rng.uniform(-3, 3, 3) * scale
    radii = np.array([62, 84, 68]) * scale * rng.uniform(0.88, 1.1, 3)
    r = _ellipsoid_distance(shape, centre, radii)
    r = r * (1 + 0.06 * _smooth_field(rng, shape, 6))
    brain = r < 1.0
    depth = (1.0 - r) * np.mean(radii)  # mm below the outer surface, roughly
    # Sulci: sheets where a folding field crosses zero, reaching sulcal_depth mm into the brain. The cortex
    # is every voxel within its (locally varying) thickness of a pial surface: the brain's outside or a sulcus.
    folds = _smooth_field(rng, shape, _u(rng, ranges.fold_frequency))
    sulcal_depth = _u(rng, ranges.sulcal_depth) * scale * (1 + 0.3 * _smooth_field(rng, shape, 5))
    sheet = brain & (np.abs(folds) < 0.08) & (depth < sulcal_depth)
    pial = ~brain | sheet
    distance = ndimage.distance_transform_edt(~pial).astype(np.float32)
    thickness = _u(rng, ranges.cortex_thickness) * scale * (1 + 0.25 * _smooth_field(rng, shape, 8))
    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = _WM
    tissue[brain & (distance < thickness)] = _GM
    csf_width = _u(rng, ranges.sulcal_csf) * scale
    tissue[brain & ((distance < csf_width) & (sheet | (depth < sulcal_depth)) | (depth < csf_width))] = _CSF
    _deep_grey(rng, tissue, centre, scale * _u(rng, ranges.deep_grey_scale))
    _ventricles(rng, tissue, centre, scale * _u(rng, ranges.ventricle_scale))
    # Where the thickness field dips to zero or below (under -4 sd: 5 of the 52 cases of `tune3`, `wide5` and
    # `heldout2`) that patch has no cortex and a negative relative depth, so a bound that thickens the cortex
    # turns the white matter under it grey first (1,222 and 1,354 voxels in the 2 of those 5 it bounds: a small
    # grey island, as a heterotopia looks); a thickness of exactly 0 gives inf or NaN, and both stay white.
    # Kept as it is: changing it would redraw documented series. Only the division's warnings are silenced.
    with np.errstate(divide="ignore", invalid="ignore"):
        relative_depth = distance / thickness
    _bound_grey_matter_share(tissue, relative_depth, ranges.grey_matter_share)
    return tissue


def grey_matter_share(tissue: np.ndarray) -> float:
    """The cortex's share of the parenchyma in a tissue map: cortical grey over white, cortical grey and deep
    grey matter (what `PhantomRanges.grey_matter_share` bounds)."""
    grey = int((tissue == _GM).sum())
    return grey / max(grey + int((tissue == _WM).sum()) + int((tissue == _DGM).sum()), 1)


def _bound_grey_matter_share(tissue: np.ndarray, relative_depth: np.ndarray, bounds: Range) -> None:
    """Moves the cortex's inner border until its share of the parenchyma lies within ``bounds``.

    ``relative_depth`` is each voxel's distance to the pial surface in units of the local cortical thickness
    (the cortex is where it is below 1), so the thinned or thickened cortex keeps the drawn thickness's
    pattern: the voxels that become cortex (or white matter) are the shallowest (deepest) ones.
    """
    share = grey_matter_share(tissue)
    low, high = bounds
    if low <= share <= high:
        return
    candidates = (tissue == _GM) | (tissue == _WM)
    parenchyma = int(candidates.sum() + (tissue == _DGM).sum())
    depths = relative_depth[candidates]
    wanted = min(int(round(min(max(share, low), high) * parenchyma)), depths.size - 1)
    threshold = np.partition(depths, wanted)[wanted]
    tissue[candidates] = np.where(depths < threshold, _GM, _WM)


def _deep_grey(rng: np.random.Generator, tissue: np.ndarray, centre: np.ndarray, scale: float) -> None:
    """Thalamus and basal ganglia: paired ellipsoids either side of the midline, below the ventricles."""
    for offset, radii in (((-6, 6, 11), (13, 19, 11)), ((2, -14, 19), (14, 19, 8))):
        for side in (-1, 1):
            c = centre + np.array([offset[0], offset[1], side * offset[2]]) * scale + rng.uniform(-2, 2, 3)
            inside = _ellipsoid_distance(tissue.shape, c, np.array(radii) * scale * rng.uniform(0.8, 1.2, 3)) < 1
            tissue[inside & (tissue == _WM)] = _DGM


def _ventricles(rng: np.random.Generator, tissue: np.ndarray, centre: np.ndarray, scale: float) -> None:
    """Lateral ventricles: two tilted ellipsoids either side of the midline, from slits to enlarged."""
    for side in (-1, 1):
        vc = centre + np.array([4, -6, side * (5 + 4 * scale)]) + rng.uniform(-2, 2, 3)
        vr = np.array([11, 28, 5.0]) * rng.uniform(0.8, 1.2, 3) * np.array([scale ** 0.5, scale ** 0.3, scale])
        tissue[(_ellipsoid_distance(tissue.shape, vc, vr) < 1.0) & (tissue != _BG)] = _CSF


def _lesion(rng: np.random.Generator, tissue: np.ndarray, scale: float, size: float, ranges: PhantomRanges,
            with_et: bool, with_ncr: bool):
    """Masks (core, enhancing, edema) of one lesion centred anywhere in the parenchyma."""
    shape = tissue.shape
    candidates = np.argwhere(np.isin(tissue[::4, ::4, ::4], (_WM, _GM, _DGM))) * 4
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    core_radii = size * scale * rng.uniform(0.7, 1.3, 3)
    # Work in a bounding box around the lesion: the edema reaches at most ~4.2 core radii.
    reach = np.ceil(core_radii.max() * (ranges.edema_extent[1] * 1.4 + 0.2) + 4).astype(int)
    lo = np.maximum(centre.astype(int) - reach, 0)
    hi = np.minimum(centre.astype(int) + reach + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    r = _ellipsoid_distance(sub_shape, centre - lo, core_radii)
    r = r * (1 + rng.uniform(0.1, 0.35) * _smooth_field(rng, sub_shape, 5))
    core = r < 1.0
    enhancing = np.zeros_like(core)
    if with_et:
        rim = rng.uniform(0.2, 0.6) if with_ncr else 1.0  # rim thickness as a fraction of the core radius
        enhancing = core & (r > 1.0 - rim * (1 + 0.3 * _smooth_field(rng, sub_shape, 6)))
    edema = (r < _u(rng, ranges.edema_extent) * (1 + 0.35 * _smooth_field(rng, sub_shape, 7))) & ~core
    brain = tissue[box] != _BG
    edema &= brain & (tissue[box] != _CSF)  # edema spreads through parenchyma, not into CSF
    full = []
    for mask in (core & brain, enhancing & brain, edema):
        canvas = np.zeros(shape, bool)
        canvas[box] = mask
        full.append(canvas)
    return full


def _tumour_labels(rng: np.random.Generator, tissue: np.ndarray, scale: float, ranges: PhantomRanges) -> np.ndarray:
    labels = np.zeros(tissue.shape, np.uint8)
    kind = rng.random()
    # By default 15% without ET, 10% solidly enhancing (no NCR).
    with_et, with_ncr = kind >= ranges.non_enhancing_share, kind < 0.9
    lesions = 1 + int(rng.random() < 0.2) + int(rng.random() < 0.08)
    for k in range(lesions):
        low, high = ranges.tumour_core_radius
        size = rng.uniform(low, high) if k == 0 else rng.uniform(low, max(low, high * 0.4))
        core, enhancing, edema = _lesion(rng, tissue, scale, size, ranges, with_et, with_ncr)
        labels[edema & (labels == 0)] = 2
        labels[core] = 1
        labels[enhancing] = 3
    return labels


def _tissue_means(rng: np.random.Generator, modality: Modality, ranges: PhantomRanges,
                  bright_core: bool = False) -> np.ndarray:
    means = np.zeros(8, np.float32)
    means[_WM] = 1.0
    for t, bounds in ranges.contrast[modality].items():
        means[t] = _u(rng, bounds)
    if modality in _EDEMA_OVER_GREY_MATTER:  # a floor, not a redraw: every other draw of a seed stays the same
        means[_ED] = max(means[_ED], means[_GM] * _EDEMA_OVER_GREY_MATTER[modality])
    means[_DGM] = _deep_grey_mean(rng, means[_GM])
    # `and` short-circuits: the deciding draw is made only when the option is on, so series drawn without it
    # keep every later draw
    if (modality is Modality.FLAIR and ranges.bright_cortex_probability > 0
            and rng.random() < ranges.bright_cortex_probability):
        means[_GM] = means[_ED] * _u(rng, ranges.bright_cortex_ratio)
        means[_DGM] = _deep_grey_mean(rng, means[_GM])
    if bright_core and modality in ranges.bright_core_ratio:
        means[_NCR] = means[_ED] * _u(rng, ranges.bright_core_ratio[modality])
    return means


def _deep_grey_mean(rng: np.random.Generator, grey_matter: float) -> float:
    """Deep grey matter's mean, drawn between white matter's (1) and the cortex's."""
    return 1.0 + (grey_matter - 1.0) * rng.uniform(0.3, 0.8)


def _thick_slices(rng: np.random.Generator, image: np.ndarray, ranges: PhantomRanges) -> np.ndarray:
    """Simulate a 2D acquisition with thick slices along one axis: average, then interpolate back."""
    axis = int(rng.integers(3))
    factor = _u(rng, ranges.thick_slice_factor)
    out = ndimage.uniform_filter1d(image, max(1, round(factor)), axis=axis)
    coarse_n = max(2, round(image.shape[axis] / factor))
    positions = np.linspace(0, image.shape[axis] - 1, coarse_n)
    coarse = np.take(out, np.round(positions).astype(int), axis=axis)
    zoom = [1.0, 1.0, 1.0]
    zoom[axis] = image.shape[axis] / coarse_n
    restored = ndimage.zoom(coarse, zoom, order=1, mode="nearest")
    # zoom may round the axis one voxel short or long: fit it back (a missing last slice stays 0)
    fitted = np.zeros_like(image)
    region = tuple(slice(0, min(a, b)) for a, b in zip(restored.shape, image.shape))
    fitted[region] = restored[region]
    return fitted


def _contrast(rng: np.random.Generator, tissue: np.ndarray, labels: np.ndarray, modality: Modality,
              ranges: PhantomRanges, bright_core: bool = False) -> np.ndarray:
    """One modality: randomised tissue means (``bright_core``: the core redrawn as bright as edema or brighter),
    patchy texture, partial-volume blur, bias field, noise, sometimes thick slices."""
    shape = tissue.shape
    region = tissue.copy()
    region[labels == NECROSIS], region[labels == EDEMA], region[labels == ENHANCING] = _NCR, _ED, _ET
    means = _tissue_means(rng, modality, ranges, bright_core)
    image = means[region]
    texture = 1 + _u(rng, ranges.texture) * _smooth_field(rng, shape, rng.uniform(20, 50))
    image = image * texture * (region != _BG)
    image = ndimage.gaussian_filter(image, _u(rng, ranges.blur_sigma))
    if rng.random() < ranges.thick_slice_probability:
        image = _thick_slices(rng, image, ranges)
    bias = np.exp(_u(rng, ranges.bias_strength) * _smooth_field(rng, shape, rng.uniform(2, 4)))
    image = image * bias + rng.normal(0, _u(rng, ranges.noise), shape).astype(np.float32)
    image[region == _BG] = 0  # skull-stripped: outside the brain is exactly zero
    return np.clip(image, 0, None)


def _store(rng: np.random.Generator, image: np.ndarray, ranges: PhantomRanges) -> np.ndarray:
    """Random intensity scale and stored dtype, as different scanners and converters produce."""
    dtype = _STORED_DTYPES[rng.integers(len(_STORED_DTYPES))]
    scaled = image * _u(rng, ranges.scale)
    if np.issubdtype(dtype, np.integer):
        return np.round(np.clip(scaled, 0, np.iinfo(dtype).max)).astype(dtype)
    return scaled.astype(dtype)


def make_phantom(seed: int, index: int, size: tuple[int, int, int] = DEFAULT_SIZE, case_id: str | None = None,
                 ranges: PhantomRanges = DEFAULT_RANGES) -> Phantom:
    """Generate phantom number ``index`` of the series ``seed``; ``size`` is (x, y, z) in voxels."""
    if len(size) != 3 or min(size) < MIN_PHANTOM_SIDE:
        raise ValueError(f"phantom size must be three integers >= {MIN_PHANTOM_SIDE}, got {size}")
    rng = np.random.default_rng([seed, index])
    shape = (size[2], size[1], size[0])
    scale = min(s / d for s, d in zip(size, DEFAULT_SIZE))
    tissue = _anatomy(rng, shape, scale, ranges)
    labels = _tumour_labels(rng, tissue, scale, ranges)
    # A property of the case, not of a modality: a tumour without ET, drawn with the option on.
    bright_core = (ranges.bright_non_enhancing_core and not (labels == ENHANCING).any()
                   and bool((labels == NECROSIS).any()))
    images = {m: _store(rng, _contrast(rng, tissue, labels, m, ranges, bright_core), ranges) for m in ranges.contrast}
    return Phantom(case_id or f"PHANTOM-{seed:04d}-{index:05d}", images, labels, tissue)


def _write(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk  # only writing needs it (generation runs where SimpleITK is absent)

    from .io import sitk_write

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin(BRATS_ORIGIN)
    image.SetDirection(BRATS_DIRECTION)
    sitk_write(image, path)


def write_phantom(phantom: Phantom, out_dir: Path, layout: Layout) -> Path:
    """Write a phantom as a case folder in ``layout``, with its ground truth; returns the folder."""
    folder = Path(out_dir) / phantom.case_id
    folder.mkdir(parents=True, exist_ok=True)
    tokens = _FILE_TOKENS[layout]
    convention = LabelConvention.for_layout(layout)
    seg = to_file_labels(phantom.labels, convention)
    if layout is Layout.TOOLKIT:
        names = {m: f"{tokens[m]}.nii.gz" for m in tokens}
        seg_name = "seg.nii.gz"
    else:
        sep = "-" if layout is Layout.BRATS2023 else "_"
        names = {m: f"{phantom.case_id}{sep}{tokens[m]}.nii.gz" for m in tokens}
        seg_name = f"{phantom.case_id}{sep}seg.nii.gz"
    for modality, name in names.items():
        _write(phantom.images[modality], folder / name)
    _write(seg, folder / seg_name)
    return folder


def generate(out_dir: Path, n: int, seed: int, layout: Layout = Layout.BRATS2023,
             size: tuple[int, int, int] = DEFAULT_SIZE, start: int = 0, mix: PhantomMix = DEFAULT_MIX) -> list[Path]:
    """Write ``n`` phantom cases (indices start .. start+n-1) of series ``seed``, drawn as ``mix`` says, into
    ``out_dir``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    folders = []
    for index in range(start, start + n):
        phantom = make_phantom(seed, index, size, mix.case_id(layout, seed, index), mix.ranges_of_case(index))
        folders.append(write_phantom(phantom, out_dir, layout))
    return folders
