"""The warnings a segmented case can carry: each a stable code a pipeline can act on and a message a person
reads. The codes are the `predict --report` JSON's ``warning_codes``; the messages its ``warnings`` and the
case's line. A warning never fails the case: its labels are written, and the user decides."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class WarningCode(str, Enum):
    """What a warning is about. New codes may be added; an existing code keeps its name and meaning."""

    # The images as read (app/io.py, app/plausibility.py)
    NONFINITE_VOXELS = "nonfinite_voxels"  # NaN/Inf voxels read as background
    STORED_BACKGROUND = "stored_background"  # a background stored as a nonzero value, read as background
    NOISE_FLOOR = "noise_floor"  # a noise floor outside the brain, read as background
    HOT_VOXELS = "hot_voxels"  # voxels far brighter than any tissue, clipped
    UNSTRIPPED_BORDER = "unstripped_border"  # the volume's border mostly nonzero: not skull-stripped?
    PARTIAL_COVERAGE = "partial_coverage"  # a modality zero over part of the brain the others cover
    COPIED_MODALITY = "copied_modality"  # two modalities hold the same image
    SWAPPED_FLAIR_T2 = "swapped_flair_t2"  # FLAIR and T2 look named the other way round
    SWAPPED_T1_T1C = "swapped_t1_t1c"  # T1 and T1c look named the other way round
    # The grid the networks read (app/preprocess.py): informational, the labels come back on the case's grid
    REORIENTED = "reoriented"
    RESAMPLED = "resampled"
    # Bias correction (app/preprocess.py): the modality went in uncorrected
    BIAS_CORRECTION_SKIPPED = "bias_correction_skipped"
    BIAS_CORRECTION_FAILED = "bias_correction_failed"
    # The device (app/inference.py)
    CPU_FALLBACK = "cpu_fallback"
    # The labels (app/confidence.py): review them
    LOW_CONFIDENCE = "low_confidence"
    FAR_EDEMA = "far_edema"
    DRAWN_CORE = "drawn_core"


@dataclass(frozen=True)
class CaseWarning:
    """One warning of a case: its ``code`` and the one-line ``message`` (what `str` gives)."""

    code: WarningCode
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, WarningCode):
            raise ValueError(f"warning code must be a WarningCode, got {self.code!r}")
        if not self.message or "\n" in self.message:
            raise ValueError(f"a warning's message is one non-empty line, got {self.message!r}")

    def __str__(self) -> str:
        return self.message


def messages(warnings: list[CaseWarning]) -> list[str]:
    """The warnings' messages, in order."""
    return [w.message for w in warnings]


def codes(warnings: list[CaseWarning]) -> list[str]:
    """The warnings' codes as the report writes them, in order."""
    return [w.code.value for w in warnings]


def cases_per_code(warnings_per_case: list[list[CaseWarning]]) -> dict[str, int]:
    """How many cases carry each code (a case counted once per code), in `WarningCode`'s order; codes no
    case carries are left out."""
    carried = [{w.code for w in warnings} for warnings in warnings_per_case]
    counts = {code.value: sum(code in codes for codes in carried) for code in WarningCode}
    return {code: n for code, n in counts.items() if n}
