"""BraTS conventions: modalities, file layouts and label encodings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from .options import choices


class Modality(str, Enum):
    """The four MRI sequences, in the network's channel order (docs/ALGORITHM.md, "Input")."""

    FLAIR = "flair"
    T1 = "t1"
    T1C = "t1c"
    T2 = "t2"


MODALITY_ORDER = (Modality.FLAIR, Modality.T1, Modality.T1C, Modality.T2)


class Layout(str, Enum):
    """How a case's files are named."""

    BRATS2023 = "2023"  # <ID>/<ID>-{t1n,t1c,t2w,t2f}.nii.gz
    BRATS2018 = "2018"  # <ID>/<ID>_{t1,t1ce,t2,flair}.nii.gz (and FeTS <ID>_brain_*)
    TOOLKIT = "toolkit"  # <ID>/{t1,t1c|t1ce,t2,flair|fla}.nii.gz


# The direction matrix (ITK, row-major) of a BraTS volume as SimpleITK reads it: array axes x and y run
# towards the patient's right and front, z upwards. The networks learnt brains stored this way.
BRATS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


class LabelConvention(str, Enum):
    """File label encodings: 2018-2021 data mark ET with 4, 2023+ data with 3."""

    BRATS2018 = "2018"
    BRATS2023 = "2023"

    @property
    def enhancing_label(self) -> int:
        return 4 if self is LabelConvention.BRATS2018 else 3

    @property
    def labels(self) -> tuple[int, ...]:
        return (0, 1, 2, self.enhancing_label)

    @classmethod
    def for_layout(cls, layout: Layout) -> LabelConvention:
        return cls.BRATS2023 if layout is Layout.BRATS2023 else cls.BRATS2018


# The --labels option: a convention, or AUTO_LABELS to follow each case's layout.
AUTO_LABELS = "auto"
LABEL_CHOICES = [AUTO_LABELS, *choices(LabelConvention)]


# Suffix tokens of each layout; the key is the token after the case prefix (lower case).
LAYOUT_TOKENS: dict[Layout, dict[str, Modality]] = {
    Layout.BRATS2023: {"t2f": Modality.FLAIR, "t1n": Modality.T1, "t1c": Modality.T1C, "t2w": Modality.T2},
    Layout.BRATS2018: {
        "flair": Modality.FLAIR, "t1": Modality.T1, "t1ce": Modality.T1C, "t2": Modality.T2,
        "brain_flair": Modality.FLAIR, "brain_t1": Modality.T1, "brain_t1ce": Modality.T1C,
        "brain_t2": Modality.T2,
    },
    Layout.TOOLKIT: {
        "flair": Modality.FLAIR, "fla": Modality.FLAIR, "t1": Modality.T1, "t1c": Modality.T1C,
        "t1ce": Modality.T1C, "t2": Modality.T2,
    },
}
# Separator between the case prefix and the modality token.
LAYOUT_SEPARATOR = {Layout.BRATS2023: "-", Layout.BRATS2018: "_"}
# Ground-truth file tokens, recognised so training folders read as they are and prediction ignores them.
SEGMENTATION_TOKENS = ("seg", "brain_seg")

# Internal classes (docs/ALGORITHM.md, "Classes and regions") and the fused label map's internal codes.
BACKGROUND, NECROSIS, EDEMA, ENHANCING, NORMAL_BRAIN = 0, 1, 2, 3, 4


def core_mask(labels: np.ndarray) -> np.ndarray:
    """The tumour core (TC: NCR/NET or ET) of an internal label map."""
    return (labels == NECROSIS) | (labels == ENHANCING)


def to_file_labels(internal: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """Map a fused internal label map (0 background, 1 NCR/NET, 2 ED, 3 ET) to the file encoding."""
    out = internal.astype(np.uint8, copy=True)
    out[internal == ENHANCING] = convention.enhancing_label
    return out


def ground_truth_convention(layout: Layout) -> LabelConvention | None:
    """The convention a ground truth named in ``layout`` is held to, or None to read either.

    Only 2023-named files are held to theirs: BraTS 2024's post-treatment glioma and paediatric releases keep
    the 2023 names but give label 4 a meaning of its own (the resection cavity; edema), which read as ET
    would train and score the wrong region without a word. A 2018-named file whose ET was re-coded 3 is read
    as it is, and a toolkit "seg.nii.gz" carries no convention in its name."""
    return LabelConvention.BRATS2023 if layout is Layout.BRATS2023 else None


# Why a label outside a convention is there, where BraTS gave it a meaning of its own.
_STRAY_LABEL_MEANING = {
    (LabelConvention.BRATS2023, 4): "BraTS 2024's post-treatment glioma files mark the resection cavity 4, a "
                                    "region this model has no class for (its paediatric files use 1-4 for "
                                    "other regions): re-code them as they are read (--truth-recode 4:0 reads "
                                    "the cavity as background) or on disk to 0-3",
    (LabelConvention.BRATS2018, 3): "BraTS 2018-2021 files mark ET 4",
}


def from_file_labels(labels: np.ndarray, convention: LabelConvention | None = None) -> np.ndarray:
    """Map a ground-truth label map to internal codes 0/1/2/3.

    With ``convention`` the file may hold only that convention's labels; without one either is read (4 or 3
    marking ET, never both). ValueError names the labels that do not fit and, where BraTS used one for
    something else, what."""
    unique = np.unique(labels)
    fractional = unique[unique != np.round(unique)]
    if fractional.size:  # a map resampled by interpolation: its labels blurred into each other at every edge
        examples = ", ".join(f"{v:.3g}" for v in fractional[:3])
        raise ValueError(f"{fractional.size} label values are not whole numbers ({examples}, ...): a label map "
                         "must be resampled by nearest neighbour, never interpolated")
    values = set(unique.tolist())
    allowed = set(convention.labels) if convention is not None else {0, 1, 2, 3, 4}
    stray = sorted(values - allowed)
    if stray:
        name = f"the BraTS {convention.value} convention {list(convention.labels)}" if convention else "0-4"
        meanings = [_STRAY_LABEL_MEANING[(convention, v)] for v in stray if (convention, v) in _STRAY_LABEL_MEANING]
        shown = f"{[int(v) for v in stray[:8]]}" + (f" and {len(stray) - 8} more" if len(stray) > 8 else "")
        raise ValueError(f"labels {shown} are not in {name}" + "".join(f": {m}" for m in meanings))
    if 3 in values and 4 in values:
        raise ValueError("labels mix 3 and 4: neither BraTS 2018 nor 2023 convention")
    out = labels.astype(np.uint8, copy=True)
    out[labels == 4] = ENHANCING
    return out


@dataclass(frozen=True)
class TruthRecoding:
    """Ground-truth labels re-coded as they are read, all pairs at once (``1:3,3:1`` exchanges two): a
    release whose labels mean other regions trains and scores with its files unchanged on disk. ``4:0`` reads
    BraTS 2024's post-treatment resection cavity as background; a paediatric release's own label table says
    which of its labels is ET, edema and the rest of the core (our 3, 2 and 1 in the 2023 convention)."""

    pairs: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, text: str) -> TruthRecoding:
        """``FROM:TO[,FROM:TO...]`` with labels 0-255, each FROM once; ValueError saying what is wrong."""
        pairs = []
        for item in text.split(","):
            try:
                source, target = (int(part) for part in item.split(":"))
            except ValueError:
                raise ValueError(f"truth recoding must be FROM:TO pairs separated by commas (e.g. 4:0), "
                                 f"got {text!r}") from None
            if not (0 <= source <= 255 and 0 <= target <= 255):
                raise ValueError(f"truth recoding {item!r}: labels must be 0-255")
            pairs.append((source, target))
        sources = [source for source, _ in pairs]
        if len(set(sources)) != len(sources):
            raise ValueError(f"truth recoding {text!r} re-codes a label twice")
        return cls(tuple(pairs))

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` with every pair's FROM replaced by its TO (all at once: a TO is never re-coded again)."""
        out = labels.copy()
        for source, target in self.pairs:
            out[labels == source] = target
        return out

    def __str__(self) -> str:
        return ",".join(f"{source}:{target}" for source, target in self.pairs)


# ------------------------------------------------------------ lesion-wise evaluation (BraTS 2023+)


@dataclass(frozen=True)
class LesionRule:
    """One BraTS challenge's two settings of the lesion-wise evaluation."""

    dilation: int  # iterations of an 18-connected dilation: lesions this close merge, predictions this close match
    max_ignored_mm3: float  # lesions of at most this volume are left out of the scores (not their matches)


# The settings of BraTS 2023's lesion-wise evaluation per challenge, as its case IDs name them (BraTS-GLI-...).
LESION_RULES = {
    "GLI": LesionRule(3, 50.0), "SSA": LesionRule(3, 50.0), "PED": LesionRule(3, 50.0),
    "MEN": LesionRule(1, 50.0), "MET": LesionRule(1, 2.0),
}
DEFAULT_LESION_CHALLENGE = "GLI"  # for IDs that name no challenge (BraTS 2018-2021's, a site's own)
AUTO_LESION_RULE = "auto"  # the rule of the challenge a case's ID names
