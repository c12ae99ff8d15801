"""The options a user chooses from, as str-enums: the code, argparse's choices and the MLCube parameters
all read them here. Nothing heavy is imported, so `--help` stays fast."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import TypeVar

E_ = TypeVar("E_", bound=Enum)


def choices(enum: type[Enum]) -> list[str]:
    """The values of a str-enum, as argparse's choices and error messages list them."""
    return [member.value for member in enum]


def parse_option(enum: type[E_], value: str | E_, name: str) -> E_:
    """``value`` as a member of ``enum``, or a ValueError naming the option and its choices."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {choices(enum)}, got {value!r}") from None


# Test-time scales (`app.inference.EnsemblePredictor`'s ``scales``, `--scales`) must lie in this range: the
# training augmentation scales patches by 0.85-1.15 (the wide recipe's by 0.75-1.3), and beyond 2x a case
# is no longer a brain the network has seen.
SCALE_RANGE = (0.5, 2.0)


def parse_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """``scales`` as a tuple, checked: at least one, none repeated, each within SCALE_RANGE."""
    values = tuple(float(s) for s in scales)
    low, high = SCALE_RANGE
    if not values:
        raise ValueError("scales needs at least one value (1 = the case as it is)")
    if len(set(values)) != len(values):
        raise ValueError(f"scales must be distinct, got {values}")
    outside = [s for s in values if not low <= s <= high]
    if outside:
        raise ValueError(f"scales must lie in [{low:g}, {high:g}], got {outside}")
    return values


# The defaults of post-processing step 3 (app.postprocess.tumour_enhances), here so that `--help` needs no
# heavy import. BraTS voxels are 1 mm^3: an ET whose largest component is under MIN_ENHANCING_VOXELS (0.1 ml)
# goes; one under ENHANCEMENT_CHECK_VOXELS (1 ml) must also be brighter on T1c than on T1, against the
# tissue around it, by MIN_ENHANCEMENT brain standard deviations (z(T1c) - z(T1)). Otherwise the tumour
# counts as non-enhancing.
MIN_ENHANCING_VOXELS = 100
ENHANCEMENT_CHECK_VOXELS = 1000
MIN_ENHANCEMENT = 1.0
# Post-processing step 6: core and ET components under this many voxels (not the largest) are specks, not
# lesions (round 58 chose it among 10, 30 and 100 on 128 design phantoms).
MIN_ISLAND_VOXELS = 30
# evaluate --predict-report: a case is poor when its mean legacy Dice over WT, TC and ET is under this, the line
# every calibration of the confidence drew (README, Confidence).
POOR_DICE = 0.7


class EdemaRelabel(str, Enum):
    """When post-processing step 2 (app.postprocess.relabel_dark_edema) runs. PAPER: in every case with
    little ET (the authors' rule). NON_ENHANCING: only in such a case whose largest ET component is also
    under step 3's floor (MIN_ENHANCING_VOXELS by default) or fails step 3's enhancement check, i.e. a tumour
    that does not enhance (ours). OFF: never."""

    NON_ENHANCING = "non-enhancing"
    PAPER = "paper"
    OFF = "off"


class EdemaSplit(str, Enum):
    """Which of a component's edema post-processing step 2 relabels NCR/NET. K_MEANS: the darker of two
    K-means clusters of its T1c intensities (the authors' split: about half of it, whatever its spread).
    DARK_TAIL: only the edema darker than the median by more than DARK_TAIL_SPREADS robust standard deviations
    (1.4826 x the median absolute deviation), i.e. a dark part that stands out of the edema's own spread."""

    K_MEANS = "k-means"
    DARK_TAIL = "dark-tail"


class KeepLargest(str, Enum):
    """Which tumour component post-processing step 5 (app.postprocess.drop_doubtful_components) spares
    whatever the ensemble thinks of it. MOST_CORE (the default since round 52): one stays only when no
    component holding core reaches even odds, and it is the one holding the most core (NCR/NET or ET), the
    largest only where no component holds core: a small enhancing tumour the whole-brain task doubts, beside
    larger edema alone, is the case's tumour rather than that edema. When a component holding core reaches
    even odds, every component under even odds goes, the largest included (a large false component, such as
    cortex read as edema, beside a smaller tumour the ensemble is sure of; a sure component of edema alone
    does not count, round 49). WHEN_NONE_SURE: as MOST_CORE, but the largest stays (rounds 46-51). ALWAYS: the
    largest always stays (the case's tumour, however unsure the ensemble is of it; the rule before round
    46)."""

    ALWAYS = "always"
    WHEN_NONE_SURE = "when-none-sure"
    MOST_CORE = "most-core"


# The dark-tail split's width, in robust standard deviations below the median (fixed before it was measured).
DARK_TAIL_SPREADS = 2.0


class Device(str, Enum):
    """Where the networks run."""

    AUTO = "auto"  # the GPU when CUDA sees one, else the CPU
    CPU = "cpu"
    CUDA = "cuda"  # an error when CUDA sees no GPU


class Precision(str, Enum):
    """Network arithmetic."""

    AUTO = "auto"  # bf16 where the device computes it natively (app.inference.native_bf16), else fp32
    FP32 = "fp32"
    BF16 = "bf16"  # autocast; emulated (slow) where the device lacks it


class Tiling(str, Enum):
    """FAST: few large tiles, a shifted grid per fold. PAPER: the authors' 16x32x32 tiles (the reference)."""

    FAST = "fast"
    PAPER = "paper"


class Mirroring(str, Enum):
    """Test-time mirroring. NONE: each fold sees the case as it is. FOLDS: fold k sees it mirrored by the
    k-th of the eight axis combinations (no extra cost: the ensemble averages over mirrors as it averages
    over grid shifts). FULL: every fold sees all eight (nnU-Net's test-time mirroring, 8x the network time)."""

    NONE = "none"
    FOLDS = "folds"
    FULL = "full"


class Fusion(str, Enum):
    """How task 2's five class probabilities label a voxel inside the fusion region. PAPER: their argmax (the
    authors'). REGIONS: BraTS's nested regions, decided in turn: tumour where NCR/NET + edema + ET is more
    likely than not, core where NCR/NET + ET is more likely than edema (app.fusion.task2_masks)."""

    PAPER = "paper"
    REGIONS = "regions"


class BiasCorrection(str, Enum):
    """Intensity non-uniformity correction before normalisation. NONE: the images as they are (the
    paper's path). N4: SimpleITK's N4 per modality inside the brain (app.preprocess.correct_bias)."""

    NONE = "none"
    N4 = "n4"


class Resampling(str, Enum):
    """The grid the network reads a case on. AUTO: a case whose voxels are coarser than 1 mm along some axis
    (thick slices; by more than 5%) is resampled to about 1 mm along it, BraTS's grid and the training's,
    and its labels brought back (app.preprocess.Regrid); finer axes are read as they are. ALL: finer axes
    too (by more than 5%) are resampled to about 1 mm (nnU-Net's way). OFF: every case on its own voxels."""

    AUTO = "auto"
    ALL = "all"
    OFF = "off"


class AugmentLevel(str, Enum):
    """Training augmentation (app.augment.AugmentConfig.for_level): NONE switches it off; STRONG draws
    the intensity and geometry transforms more often and over wider ranges (flips as DEFAULT)."""

    NONE = "none"
    DEFAULT = "default"
    STRONG = "strong"


class PhantomPreset(str, Enum):
    """Which ranges generated phantoms are drawn from (`phantoms --ranges`, `train --phantom-ranges`;
    app.phantoms.RANGE_PRESETS). TRAINING: the generator's own ranges. WIDE: every appearance and anatomy
    range stretched beyond them where scanners and brains reach (thicker cortex, brighter grey matter,
    stronger bias, more noise, blur and thick slices): a set outside those ranges, to test on or to train on.
    MIXED: the two alternating case by case (even indices TRAINING, odd WIDE), so a fine-tune on the wide
    ranges keeps seeing the training ranges it started from."""

    TRAINING = "training"
    WIDE = "wide"
    MIXED = "mixed"


# The smallest side of a generated phantom, in voxels: below it the anatomy scaled with the size has no room
# for a cortex, ventricles and a tumour (`phantoms --size`, `train --phantom-size`).
MIN_PHANTOM_SIDE = 16


class Variant(str, Enum):
    """Network variants of the paper's Table I. SINGLE is one task's network, the cascade's building block
    (not trained or shipped on its own)."""

    OMNET = "omnet"
    OMNET_CGA = "omnet_cga"
    OMNET_SE = "omnet_se"
    CASCADE = "cascade"  # MC3: three single-task networks
    SINGLE = "single"


TRAINABLE_VARIANTS = [v.value for v in Variant if v is not Variant.SINGLE]
