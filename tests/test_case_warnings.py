from pathlib import Path

import pytest

from app.case_warnings import CaseWarning, WarningCode, cases_per_code, codes, messages


def test_a_warning_is_a_known_code_and_one_line_and_reads_as_its_message():
    warning = CaseWarning(WarningCode.COPIED_MODALITY, "t1 and t1c hold the same image")
    assert str(warning) == "t1 and t1c hold the same image" and f"{warning}" == warning.message
    later = CaseWarning(WarningCode.LOW_CONFIDENCE, "low confidence: review this segmentation")
    assert messages([warning, later]) == [warning.message, later.message]
    assert codes([warning, later]) == ["copied_modality", "low_confidence"]
    for code, message in [("copied_modality", "x"), (WarningCode.FAR_EDEMA, ""), (WarningCode.FAR_EDEMA, "a\nb")]:
        with pytest.raises(ValueError, match="warning"):
            CaseWarning(code, message)


def test_the_codes_are_distinct_lower_case_names():
    values = [code.value for code in WarningCode]
    assert len(set(values)) == len(values)
    assert all(value == value.lower() and value.replace("_", "").isalnum() for value in values)


def test_the_readme_explains_every_code():
    """The README's table of codes is what a pipeline's author reads: every code has its row there."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    for code in WarningCode:
        assert any(f"`{code.value}`" in row.split("|")[1] for row in rows), code


def test_cases_are_counted_once_per_code_in_the_enum_order():
    low = CaseWarning(WarningCode.LOW_CONFIDENCE, "low confidence: review this segmentation")
    copy = CaseWarning(WarningCode.COPIED_MODALITY, "t1 and t1c hold the same image")
    assert cases_per_code([[low, copy, copy], [low], []]) == {"copied_modality": 1, "low_confidence": 2}
    assert list(cases_per_code([[low, copy]])) == ["copied_modality", "low_confidence"]
    assert cases_per_code([[], []]) == {}
