"""Checks that a case's four images are what their names say: a skull-stripped brain, four distinct
contrasts, FLAIR and T2 in their own places. Each failed check is a warning (the case is still segmented):
the images are readable, and only their user can say whether they are wrong.

The copy and swap checks read the (C, D, H, W) image as `io.load_case` stacks it, on every second voxel along
each axis, which answers them as well as every voxel does: about 0.1 s for a BraTS case on one CPU core. What
they measured (`ImageChecks`) goes into the report beside the warnings, so that a site sees how near its cases
come to each threshold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import ndimage

from .case_warnings import CaseWarning, WarningCode
from .conventions import Modality
from .preprocess import connected_to, face_mask, uncovered, volume_faces

# BraTS images are skull-stripped: zero outside the brain, so the volume's border is background. A case
# whose border is mostly nonzero in some modality (an unstripped head, or a scanner's noise floor) is read
# as if every nonzero voxel were brain, and gets a warning saying so, unless its border is a noise floor
# (`noise_floor`, below).
MAX_NONZERO_BORDER_SHARE = 0.5
# A brain stored over its scanner's noise floor (magnitude images are never 0 outside the head, and a stripping
# tool may mask with it) has a border of small varied values, and every voxel was then read as brain: WT 0.90
# -> 0.12 on six phantoms with a floor at 2% of the brain's median (EXPERIMENTS round 63). Where the border is
# mostly nonzero, the voxels within the border's range in every modality (its 0.1st to 99.9th percentile,
# which leaves out the outliers of a long-tailed noise) that are one piece with the volume's faces are read as
# background, and so are the specks above that range they enclose (pieces under this share of the rest) ...
NOISE_FLOOR_PERCENTILE = 99.9
NOISE_SPECK_SHARE = 1e-3
# ... when the floor is a floor: in each modality whose border is nonzero, the range's top lies under this
# share of the median of the brain it leaves (0.19 for a Rician floor at 5% of it; a floor at 13% reaches
# 0.5). A head whose tissue fills the border gives a range as wide as its tissue's, and stays as it is.
MAX_NOISE_FLOOR_SHARE = 0.5
# A skull-stripped adult brain holds 1,000-1,900 ml; more nonzero voxels than this (an unstripped head stored
# over a background of 0, or whose noise floor was read as background) earn the unstripped warning too.
MAX_BRAIN_ML = 2500.0
# Images normalised over the whole volume (z-scored with their background, as some pipelines do) store the
# background as one nonzero value (about -0.4 on BraTS-sized phantoms), and every voxel is then read as brain:
# WT Dice 0.14 and 0.18 on two phantoms (EXPERIMENTS round 62). When at least this share of a modality's
# border holds one nonzero value, `io.load_case` reads that value as background.
CONSTANT_BACKGROUND_SHARE = 0.9
# A few voxels far brighter than any tissue (a reconstruction spike, an overflow in a conversion) stretch a
# modality's z-scores until its tissues read alike: 20 voxels at 1000x a T1c's maximum took a case's TC from
# 0.97 to 0.18 and its ET to 0 (EXPERIMENTS round 62). `io.load_case` clips voxels above this multiple of the
# modality's 99.9th percentile inside the brain to it; tissue reaches 1.54x over 40 images of both generators.
HOT_VOXEL_FACTOR = 3.0
# A missing modality is sometimes filled with a copy of another (T1 for a T1c never acquired): what tells the
# two apart is then lost, and the labels read from it are guessed. Distinct MR contrasts correlate far below
# this inside the brain (at most 0.91 over 24 phantoms of both generators, EXPERIMENTS round 61); a copy,
# rescaled or rounded into another dtype, correlates above it.
COPIED_MODALITY_CORRELATION = 0.999
# CSF, the darkest tissue on T1, is the brightest on T2 and dark on FLAIR (whose inversion suppresses it).
# Where T1 is darkest, T2 stands above FLAIR in brain-wide rank (`csf_contrast`): by 0.15 to 0.92 over 40
# BraTS-sized phantoms of ours and 0.27 to 0.95 over 20 of the second generator (EXPERIMENTS round 61), so
# the same cases named the other way round give -0.15 to -0.95. Below this the two are taken for swapped, with
# a margin for a FLAIR that suppresses CSF poorly and a large dark necrosis. (At 0.4 of the BraTS size, blur
# and thick slices wipe out thin CSF, and one of our phantoms gave -0.10: the check is for brains of real size.
# A strongly blurred image, whose darkened brain edge fills the darkest 5% on T1, gives about 0: no warning,
# whichever way it is named.)
SWAPPED_CSF_CONTRAST = -0.2
# A brain smaller than this (a test volume, a crop) is not checked for it, nor for T1 and T1c (below): adult
# brains hold 1,000-1,500 ml.
MIN_CHECKED_BRAIN_ML = 400.0
# The share of brain voxels darkest on T1 that `csf_contrast` reads as CSF (with dark necrosis, if any).
DARKEST_T1_SHARE = 0.05
# T1c is T1 after gadolinium: an enhancing tumour (and vessels, on real images) brightens on it, and nothing is
# far brighter on T1 than on T1c. Over the brain both cover, z(t1c) - z(t1) then has a longer upper tail than
# lower (`enhancement_asymmetry`: its 99.9th and 0.1st percentiles summed): -1.27 to 4.50 over 36 BraTS-sized
# phantoms of both generators, 0.00 to 4.04 over 16 more (EXPERIMENTS round 63); the lowest are tumours that
# do not enhance, under our widest contrasts. Named the other way round, the same cases give the negative.
# Below this the two are taken for swapped: a swap costs the enhancing tumour (six cases: ET 0 on each of the
# four that have one, TC 0.75 -> 0.17). Brains under `MIN_CHECKED_BRAIN_ML` are not checked.
SWAPPED_ENHANCEMENT_ASYMMETRY = -2.0
# Percentiles 0.1 and 99.9 rest on a single voxel each below this many (both T1 and T1c nonzero): no tails to
# compare, so no asymmetry. (Brains over `MIN_CHECKED_BRAIN_ML` give tens of thousands in the sample.)
MIN_ASYMMETRY_VOXELS = 1000


def _brain_sample(image: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray:
    """(C, N) float64 values of every second voxel along each axis that is inside the brain (nonzero in
    some modality; ``brain``, that mask where the caller has it already)."""
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W) image, got shape {image.shape}")
    sample = image[:, ::2, ::2, ::2]
    inside = (sample != 0).any(0) if brain is None else brain[::2, ::2, ::2]
    return sample[:, inside].astype(np.float64)


def nonzero_border_share(image: np.ndarray) -> float:
    """The share of the voxels on the six faces of a (C, D, H, W) case that are nonzero in any modality
    (edges and corners count once per face): 0 for a skull-stripped brain inside its volume, near 1 for a
    head with a noisy background."""
    if image.ndim != 4:
        raise ValueError(f"expected (C, D, H, W) image, got shape {image.shape}")
    faces = volume_faces(image)
    nonzero = sum(int((face != 0).any(0).sum()) for face in faces)
    return nonzero / sum(face[0].size for face in faces)


def stored_background(channel: np.ndarray) -> float | None:
    """The nonzero value a (D, H, W) modality stores its background as: the value at least
    `CONSTANT_BACKGROUND_SHARE` of its border voxels hold, where some voxel holds another. None for a
    background of 0, a border of varied values (an unstripped head) or a constant image."""
    if channel.ndim != 3:
        raise ValueError(f"expected (D, H, W) modality, got shape {channel.shape}")
    border = np.concatenate([face.ravel() for face in volume_faces(channel)])
    values, counts = np.unique(border, return_counts=True)
    value = values[counts.argmax()]
    if value == 0 or counts.max() < CONSTANT_BACKGROUND_SHARE * border.size or (channel == value).all():
        return None
    return float(value)


@dataclass(frozen=True)
class NoiseFloor:
    """A noise floor around the brain (`noise_floor`): ``background``, the (D, H, W) voxels read as background,
    and ``ceilings``, each modality's highest value read as the floor (0 where its border is 0)."""

    background: np.ndarray
    ceilings: tuple[float, ...]


def noise_floor(image: np.ndarray) -> NoiseFloor | None:
    """The noise floor a (C, D, H, W) case stores its background as: where over `MAX_NONZERO_BORDER_SHARE` of
    its border is nonzero, the voxels within the border's range in every modality that are one piece with the
    volume's faces, with the specks they enclose; None where the border is mostly 0, or where what that leaves
    is not a brain over a floor (`MAX_NOISE_FLOOR_SHARE`)."""
    if nonzero_border_share(image) <= MAX_NONZERO_BORDER_SHARE:
        return None
    within = np.ones(image.shape[1:], bool)
    ceilings = []
    for channel in image:
        border = np.concatenate([face.ravel() for face in volume_faces(channel)])
        low, high = np.percentile(border, [100 - NOISE_FLOOR_PERCENTILE, NOISE_FLOOR_PERCENTILE])
        within &= (channel >= low) & (channel <= high)
        ceilings.append(float(high))
    background = connected_to(within, face_mask(within.shape))
    brain_pieces, count = ndimage.label(~background)
    sizes = np.bincount(brain_pieces.ravel(), minlength=count + 1)
    specks = sizes < NOISE_SPECK_SHARE * sizes[1:].sum()
    specks[0] = True  # label 0 is the background itself
    background = specks[brain_pieces]
    brain = ~background
    if not brain.any():
        return None
    for channel, ceiling in zip(image, ceilings):
        if ceiling != 0 and ceiling >= MAX_NOISE_FLOOR_SHARE * float(np.median(channel[brain])):
            return None
    return NoiseFloor(background, tuple(ceilings))


def hot_voxel_ceiling(channel: np.ndarray) -> float | None:
    """`HOT_VOXEL_FACTOR` times a (D, H, W) modality's 99.9th percentile over its nonzero voxels (read on every
    second voxel along each axis: a tenth of the time, the same percentile within a few percent), when some
    voxel lies above it; None otherwise."""
    sample = channel[::2, ::2, ::2]
    values = sample[sample != 0]
    if values.size == 0:
        return None
    ceiling = HOT_VOXEL_FACTOR * float(np.percentile(values, 99.9))
    return ceiling if ceiling > 0 and float(channel.max()) > ceiling else None


def copied_modalities(image: np.ndarray) -> list[tuple[int, int, float]]:
    """The channel pairs (a, b, correlation) of a (C, D, H, W) case whose voxels inside the brain are one
    image, however rescaled: Pearson correlation at least `COPIED_MODALITY_CORRELATION`."""
    return [(a, b, r) for (a, b), r in _correlations(_brain_sample(image)).items()
            if r is not None and r >= COPIED_MODALITY_CORRELATION]


def _correlations(voxels: np.ndarray) -> dict[tuple[int, int], float | None]:
    """Pearson's r of every channel pair (a < b) of a brain sample (`_brain_sample`); None where a channel is
    constant (no correlation, never a copy) or the sample holds under two voxels."""
    pairs = list(combinations(range(len(voxels)), 2))
    if voxels.shape[1] < 2:
        return dict.fromkeys(pairs)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.corrcoef(voxels)
    return {(a, b): None if np.isnan(correlation[a, b]) else float(correlation[a, b]) for a, b in pairs}


def csf_contrast(image: np.ndarray, modalities: Sequence[Modality]) -> float | None:
    """How far T2 stands above FLAIR where T1 is darkest (CSF): the difference of their median brain-wide
    ranks (0-1) over the `DARKEST_T1_SHARE` of brain voxels darkest on T1. Positive when the two are named
    right, negative when swapped; None for a brain too small to tell."""
    return _csf_contrast(_brain_sample(image), modalities)


def _csf_contrast(voxels: np.ndarray, modalities: Sequence[Modality]) -> float | None:
    """`csf_contrast` of a brain sample (`_brain_sample`)."""
    from scipy.stats import rankdata

    if len(modalities) != len(voxels):
        raise ValueError(f"{len(modalities)} modality names for {len(voxels)} channels")
    if voxels.shape[1] < 1 / DARKEST_T1_SHARE:
        return None
    flair, t1, t2 = (voxels[list(modalities).index(m)] for m in (Modality.FLAIR, Modality.T1, Modality.T2))
    darkest = rankdata(t1) <= DARKEST_T1_SHARE * t1.size
    if not darkest.any():  # T1 constant over most of the brain: nothing to call dark
        return None
    rank = {name: rankdata(values)[darkest] / values.size for name, values in (("flair", flair), ("t2", t2))}
    return float(np.median(rank["t2"]) - np.median(rank["flair"]))


def enhancement_asymmetry(image: np.ndarray, modalities: Sequence[Modality]) -> float | None:
    """How much longer the upper tail of z(t1c) - z(t1) is than its lower one (their 99.9th and 0.1st
    percentiles summed, each modality z-scored over the voxels both cover): positive where the tumour enhances
    and the two are named right, negative when swapped, about 0 without enhancement; None for too few voxels."""
    return _enhancement_asymmetry(_brain_sample(image), modalities)


def _enhancement_asymmetry(voxels: np.ndarray, modalities: Sequence[Modality]) -> float | None:
    """`enhancement_asymmetry` of a brain sample (`_brain_sample`)."""
    if len(modalities) != len(voxels):
        raise ValueError(f"{len(modalities)} modality names for {len(voxels)} channels")
    t1, t1c = (voxels[list(modalities).index(m)] for m in (Modality.T1, Modality.T1C))
    both = (t1 != 0) & (t1c != 0)
    t1, t1c = t1[both], t1c[both]
    if t1.size < MIN_ASYMMETRY_VOXELS or t1.std() == 0 or t1c.std() == 0:
        return None
    difference = (t1c - t1c.mean()) / t1c.std() - (t1 - t1.mean()) / t1.std()
    high, low = np.percentile(difference, [99.9, 0.1])
    return float(high + low)


@dataclass(frozen=True)
class ImageChecks:
    """What the checks measured on a case's images, which `predict --report` records (``image_checks``) so
    that a user sees how near each case came to a warning: the share of the volume's border that is nonzero,
    the brain's volume in ml, each modality's share of the brain that it leaves uncovered (its gap,
    `preprocess.uncovered`: 0 unless over 1%), Pearson's r of every pair of modalities inside the brain (None
    where a channel is constant), the CSF contrast and the enhancement asymmetry (each None where the brain is
    under `MIN_CHECKED_BRAIN_ML`)."""

    modalities: tuple[str, ...]
    border_share: float
    brain_ml: float
    uncovered: tuple[float, ...]  # per modality, the share of the brain in its gap (`preprocess.uncovered`)
    correlations: dict[tuple[int, int], float | None]
    csf_contrast: float | None
    enhancement_asymmetry: float | None

    def warnings(self) -> list[CaseWarning]:
        """The warnings these measurements earn: an unstripped border, a modality that does not cover the
        brain, a modality that is a copy of another, FLAIR and T2 or T1 and T1c that look swapped."""
        warnings = []
        if self.border_share > MAX_NONZERO_BORDER_SHARE:
            warnings.append(CaseWarning(WarningCode.UNSTRIPPED_BORDER,
                                        f"{self.border_share:.0%} of the volume's border is nonzero: is the case "
                                        "skull-stripped? every nonzero voxel is read as brain"))
        elif self.brain_ml > MAX_BRAIN_ML:
            warnings.append(CaseWarning(WarningCode.UNSTRIPPED_BORDER,
                                        f"{self.brain_ml:.0f} ml of nonzero voxels, more than a brain holds: is "
                                        "the case skull-stripped? every nonzero voxel is read as brain"))
        names = self.modalities
        partial = [f"{name} {share:.0%}" for name, share in zip(names, self.uncovered) if share > 0]
        if partial:
            warnings.append(CaseWarning(
                WarningCode.PARTIAL_COVERAGE,
                f"not every modality covers the brain the others do (zero, up to the brain's edge, over "
                f"{', '.join(partial)} of it; skull-stripped one by one? acquired over fewer slices?): read as "
                "average there, where the labels are less reliable"))
        for (a, b), r in self.correlations.items():
            if r is not None and r >= COPIED_MODALITY_CORRELATION:
                warnings.append(CaseWarning(
                    WarningCode.COPIED_MODALITY,
                    f"{names[a]} and {names[b]} hold the same image (correlation {r:.4f} inside the brain): a "
                    "missing modality filled with a copy? the contrast between them is lost, and the labels read "
                    "from it (ET from t1c against t1, edema from flair against t2) are unreliable"))
        if self.csf_contrast is not None and self.csf_contrast < SWAPPED_CSF_CONTRAST:
            warnings.append(CaseWarning(
                WarningCode.SWAPPED_FLAIR_T2,
                f"flair and t2 look swapped: CSF (darkest on t1) is brighter on the flair than on the t2 image "
                f"(rank difference {-self.csf_contrast:.2f}), as on a T2 and never on a FLAIR; check which file "
                "is which"))
        if self.enhancement_asymmetry is not None and self.enhancement_asymmetry < SWAPPED_ENHANCEMENT_ASYMMETRY:
            warnings.append(CaseWarning(
                WarningCode.SWAPPED_T1_T1C,
                f"t1 and t1c look swapped: voxels far brighter on the t1 file than on the t1c one, and none the "
                f"other way (tail asymmetry {self.enhancement_asymmetry:.2f}), as enhancement is on a T1c and "
                "never on a T1; check which file is which (a swap loses the enhancing tumour)"))
        return warnings

    def as_report(self) -> dict:
        """The measurements as the report's JSON holds them (pairs named ``flair/t1``, 4 decimals)."""
        return {"border_share": round(self.border_share, 4), "brain_ml": round(self.brain_ml, 1),
                "uncovered": {name: round(share, 4) for name, share in zip(self.modalities, self.uncovered)},
                "correlations": {f"{self.modalities[a]}/{self.modalities[b]}": _rounded(r)
                                 for (a, b), r in self.correlations.items()},
                "csf_contrast": _rounded(self.csf_contrast),
                "enhancement_asymmetry": _rounded(self.enhancement_asymmetry)}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def check_images(image: np.ndarray, modalities: Sequence[Modality], voxel_ml: float) -> ImageChecks:
    """`ImageChecks` of a (C, D, H, W) case whose channels hold ``modalities`` (``voxel_ml``: one voxel's
    volume, which decides whether the brain is large enough for the CSF contrast)."""
    if len(modalities) != len(image):
        raise ValueError(f"{len(modalities)} modality names for {len(image)} channels")
    brain = (image != 0).any(0)
    voxels = _brain_sample(image, brain)  # sampled once for the measures below
    brain_ml = float(np.count_nonzero(brain)) * voxel_ml
    gaps = [uncovered(channel, brain) for channel in image]
    shares = tuple(0.0 if gap is None else np.count_nonzero(gap) / np.count_nonzero(brain) for gap in gaps)
    large = brain_ml >= MIN_CHECKED_BRAIN_ML
    return ImageChecks(tuple(m.value for m in modalities), nonzero_border_share(image), brain_ml, shares,
                       _correlations(voxels), _csf_contrast(voxels, modalities) if large else None,
                       _enhancement_asymmetry(voxels, modalities) if large else None)


def content_warnings(image: np.ndarray, modalities: Sequence[Modality], voxel_ml: float) -> list[CaseWarning]:
    """The warnings a case's images earn (`ImageChecks.warnings`)."""
    return check_images(image, modalities, voxel_ml).warnings()
