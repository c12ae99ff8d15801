"""The evaluate job: BraTS metrics of a prediction folder against cases with ground truth."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import SimpleITK as sitk

from .case_warnings import WarningCode
from .conventions import (
    AUTO_LABELS,
    AUTO_LESION_RULE,
    LESION_RULES,
    LabelConvention,
    TruthRecoding,
    from_file_labels,
    ground_truth_convention,
)
from .errors import one_line
from .io import (
    CaseError,
    CaseFiles,
    find_cases,
    find_segmentations,
    geometry_difference,
    read_image,
    segmentation_layout,
    writable_file,
    writable_folder,
)
from .metrics import REGIONS, case_lesion_scores, case_scores, lesion_challenge
from .options import POOR_DICE
from .qc import save_evaluation_picture

METRICS = ("dice", "hd95", "sensitivity", "specificity", "ppv")
# BraTS 2023's lesion-wise scores per region: the two it ranks by, then the lesions missed and the false positives.
LESION_METRICS = ("dice", "hd95", "fn", "fp")


def _file_labels_to_internal(labels: np.ndarray, convention: LabelConvention | None, case_id: str,
                             path: Path) -> np.ndarray:
    try:
        return from_file_labels(labels, convention)
    except ValueError as err:
        raise CaseError(case_id, path, str(err)) from None


def _truth_convention(path: Path) -> LabelConvention | None:
    """What a ground truth's file name holds it to under --labels auto (`ground_truth_convention`)."""
    layout = segmentation_layout(path)
    return None if layout is None else ground_truth_convention(layout)


def _chosen_convention(labels: str) -> LabelConvention | None:
    """The --labels choice as a convention; None for auto."""
    return None if labels == AUTO_LABELS else LabelConvention(labels)


@dataclass
class Evaluation:
    """What `evaluate_cases` scored: per-case metric rows, the IDs whose prediction was absent and the
    problems found on the way (each names the case and the file)."""

    rows: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # no prediction file: scored as empty
    unmatched: list[str] = field(default_factory=list)  # a prediction file whose ID has no ground truth
    unusable: list[CaseError] = field(default_factory=list)  # a prediction that cannot be used: scored as empty
    unscored: list[CaseError] = field(default_factory=list)  # ground truth that cannot be read: not scored
    pictures: list[CaseError] = field(default_factory=list)  # QC pictures that could not be drawn
    lesion_rules: dict[str, int] = field(default_factory=dict)  # cases scored lesion-wise by each challenge's rule

    @property
    def problems(self) -> list[str]:
        """One line per problem, saying what became of the case."""
        return ([f"{err} (scored as an empty prediction)" for err in self.unusable]
                + [f"{err} (not scored)" for err in self.unscored]
                + [f"{err} (no QC picture)" for err in self.pictures])


def evaluate_cases(pred_dir: Path, gt_dir: Path, labels: str = AUTO_LABELS, qc_dir: Path | None = None,
                   lesion_rule: str = AUTO_LESION_RULE, recoding: TruthRecoding | None = None) -> Evaluation:
    """Score every case under ``gt_dir`` that has a ground truth against ``pred_dir/<ID>.nii.gz``: the legacy
    region metrics and BraTS 2023's lesion-wise ones, by the rule of the challenge the case's ID names
    (``lesion_rule`` "auto", GLI's for other IDs) or of ``lesion_rule`` (a `LESION_RULES` key). The truths'
    labels are re-coded by ``recoding`` as they are read.

    One case's problem never stops the others: a prediction that cannot be read, lies on another grid or
    holds labels outside the convention is scored as empty (as a missing one is, the challenge's rule) and
    reported; a ground truth that cannot be read (or two for one ID) is reported and left out. Only the
    ground truths are needed (`find_segmentations`); the images beside them, for ``qc_dir``'s pictures.
    Raises ValueError when ``gt_dir`` holds no ground truth or ``lesion_rule`` names no rule."""
    if lesion_rule != AUTO_LESION_RULE and lesion_rule not in LESION_RULES:
        raise ValueError(f"lesion_rule must be one of {[AUTO_LESION_RULE, *LESION_RULES]}, got {lesion_rule!r}")
    segmentations, errors = find_segmentations(gt_dir)
    if not segmentations and not errors:
        raise ValueError(f"no ground-truth segmentation (<ID>-seg.nii.gz, <ID>_seg.nii.gz) under {gt_dir}")
    result = Evaluation(unscored=errors)
    with_images = {case.case_id: case for case in find_cases(gt_dir).cases} if qc_dir is not None else {}
    for case_id, truth_path in segmentations.items():
        try:
            truth_image = read_image(truth_path, case_id)
            convention = _chosen_convention(labels) or _truth_convention(truth_path)
            stored = sitk.GetArrayFromImage(truth_image)
            stored = stored if recoding is None else recoding.apply(stored)
            truth = _file_labels_to_internal(stored, convention, case_id, truth_path)
        except CaseError as err:
            result.unscored.append(err)
            continue
        pred = _prediction(case_id, Path(pred_dir) / f"{case_id}.nii.gz", truth_image, labels, result)
        spacing = tuple(reversed(truth_image.GetSpacing()))  # array order z, y, x
        scored = np.zeros_like(truth) if pred is None else pred
        scores = case_scores(scored, truth, spacing)
        challenge = lesion_challenge(case_id) if lesion_rule == AUTO_LESION_RULE else lesion_rule
        lesions = case_lesion_scores(scored, truth, spacing, LESION_RULES[challenge])
        row = {"case": case_id}
        for region in REGIONS:
            for metric in METRICS:
                row[f"{metric}_{region}"] = getattr(scores[region], metric)
        for region in REGIONS:
            for metric in LESION_METRICS:
                row[f"lesion_{metric}_{region}"] = getattr(lesions[region], metric)
        result.rows.append(row)
        result.lesion_rules[challenge] = result.lesion_rules.get(challenge, 0) + 1
        if qc_dir is not None and pred is not None:
            _picture(with_images.get(case_id), case_id, truth_path, pred, truth, qc_dir, result)
    known = set(segmentations) | {err.case_id for err in errors}
    result.unmatched = [case_id for case_id in _prediction_ids(Path(pred_dir)) if case_id not in known]
    return result


def _prediction_ids(pred_dir: Path) -> list[str]:
    """The IDs of the label maps in a prediction folder (``<ID>.nii.gz``; hidden names left out)."""
    if not pred_dir.is_dir():
        return []
    names = (p.name for p in pred_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(name[: -len(".nii.gz")] for name in names if name.endswith(".nii.gz"))


def _picture(case: CaseFiles | None, case_id: str, truth_path: Path, pred: np.ndarray, truth: np.ndarray,
             folder: Path, result: Evaluation) -> None:
    """Draw the case's QC picture, recording in ``result`` why it cannot be (no images beside its truth)."""
    try:
        if case is None:
            raise CaseError(case_id, truth_path.parent, "the four images are not beside the ground truth")
        save_evaluation_picture(case, pred, truth, folder)
    except CaseError as err:
        result.pictures.append(err)
    except OSError as err:  # a full disk: the scores still stand
        result.pictures.append(CaseError(case_id, Path(folder) / f"{case_id}.png", err.strerror or str(err)))


def _prediction(case_id: str, path: Path, truth_image: sitk.Image, labels: str,
                result: Evaluation) -> np.ndarray | None:
    """The case's prediction as an internal label map, or None (scored as empty) when it is absent or cannot
    be used, which ``result`` records."""
    if not path.is_file():
        result.missing.append(case_id)
        return None
    try:
        image = read_image(path, case_id)
        difference = geometry_difference(image, truth_image)
        if difference is not None:
            raise CaseError(case_id, path, f"prediction geometry differs from the ground truth: {difference}")
        return _file_labels_to_internal(sitk.GetArrayFromImage(image), _chosen_convention(labels), case_id, path)
    except CaseError as err:
        result.unusable.append(err)
        return None


@dataclass(frozen=True)
class PredictedCase:
    """What `predict --report` recorded of a case: its confidence (None where none was computed: a failed or
    skipped case) and its warnings' codes (`WarningCode` values, in the report's order)."""

    confidence: float | None
    warning_codes: tuple[str, ...] = ()

    @property
    def warned(self) -> bool:
        """Whether the case earned the low-confidence warning."""
        return WarningCode.LOW_CONFIDENCE.value in self.warning_codes


def read_predict_report(path: Path) -> dict[str, PredictedCase]:
    """The cases of a JSON file that `predict --report` wrote, by ID; ValueError naming the file when it
    cannot be read or is not such a report."""
    try:
        cases = json.loads(Path(path).read_text())["cases"]
        report = {}
        for case in cases:
            confidence = case.get("confidence")
            if not (confidence is None or isinstance(confidence, (int, float))):
                raise TypeError("confidence is not a number")
            report[str(case["case_id"])] = PredictedCase(confidence, _reported_codes(case))
        return report
    except OSError as err:
        raise ValueError(f"--predict-report {path}: {one_line(err)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"--predict-report {path} is not JSON: give the file predict --report wrote") from None
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"--predict-report {path} is not a report that predict --report writes (a list of cases "
                         "with case_id, confidence and warnings)") from None


def _reported_codes(case: dict) -> tuple[str, ...]:
    """A report record's warning codes. Reports written before the codes existed carry only the messages,
    of which the low-confidence warning's is recognised."""
    if "warning_codes" in case:
        if not all(isinstance(code, str) for code in case["warning_codes"]):
            raise TypeError("warning_codes holds something other than strings")
        return tuple(case["warning_codes"])
    from .confidence import LOW_CONFIDENCE_WARNING  # here: confidence imports torch, which scoring never needs

    return (WarningCode.LOW_CONFIDENCE.value,) if LOW_CONFIDENCE_WARNING.message in case.get("warnings", []) else ()


def join_confidence(rows: list[dict], report: dict[str, PredictedCase]) -> None:
    """Give every scored row the ``confidence`` its case has in ``report`` and ``warned`` (1 or 0): NaN for
    a case the report holds no confidence for."""
    for row in rows:
        case = report.get(row["case"])
        known = case is not None and case.confidence is not None
        row["confidence"] = float(case.confidence) if known else math.nan
        row["warned"] = float(case.warned) if known else math.nan


@dataclass(frozen=True)
class ConfidenceCheck:
    """How the confidence of `predict --report` tracked the Dice on scored cases: the poor cases (mean
    Dice under ``poor``) the low-confidence warning caught, the others it flagged, and the Pearson r of the
    confidence with the mean Dice (None for fewer than two cases or a constant column)."""

    cases: int
    without_confidence: int
    poor_line: float
    poor: int
    caught: int
    flagged_others: int
    pearson: float | None

    def line(self) -> str:
        r = "undefined" if self.pearson is None else f"{self.pearson:.2f}"
        line = (f"confidence from the predict report, on {self.cases} case(s): the low-confidence warning caught "
                f"{self.caught} of {self.poor} poor case(s) (mean Dice under {self.poor_line:g}) and flagged "
                f"{self.flagged_others} of {self.cases - self.poor} other(s); Pearson r with the mean Dice {r}")
        if self.without_confidence:
            line += f"; {self.without_confidence} scored case(s) have no confidence in the report"
        return line


def check_confidence(rows: list[dict], poor: float = POOR_DICE) -> ConfidenceCheck:
    """`ConfidenceCheck` of rows that `join_confidence` gave a confidence."""
    known = [row for row in rows if not math.isnan(row["confidence"])]
    dice = np.array([_mean_dice(row) for row in known])
    confidence = np.array([row["confidence"] for row in known])
    warned = np.array([row["warned"] == 1 for row in known], bool)
    bad = dice < poor
    pearson = None
    if len(known) >= 2 and confidence.std() > 0 and dice.std() > 0:
        pearson = float(np.corrcoef(confidence, dice)[0, 1])
    return ConfidenceCheck(len(known), len(rows) - len(known), poor, int(bad.sum()), int((bad & warned).sum()),
                           int((~bad & warned).sum()), pearson)


@dataclass(frozen=True)
class WarningTally:
    """The scored cases that carry one warning ``code`` (None: the cases without any), how many of them are
    poor, and their mean Dice over WT, TC and ET."""

    code: str | None
    cases: int
    poor: int
    mean_dice: float


def tally_warnings(rows: list[dict], report: dict[str, PredictedCase], poor: float = POOR_DICE) -> list[WarningTally]:
    """One `WarningTally` per warning code that scored cases with a confidence in ``report`` carry (in
    `WarningCode`'s order, codes it does not know after them), then one for those with no warning: does each
    warning fall on the cases that went wrong, and which poor cases did none of them flag?"""
    known = [(row, report[row["case"]]) for row in rows
             if row["case"] in report and report[row["case"]].confidence is not None]
    order = [code.value for code in WarningCode]
    seen = {code for _, case in known for code in case.warning_codes}
    ranked = sorted(seen, key=lambda code: (order.index(code) if code in order else len(order), code))
    groups: list[tuple[str | None, list[dict]]] = [
        (code, [row for row, case in known if code in case.warning_codes]) for code in ranked]
    groups.append((None, [row for row, case in known if not case.warning_codes]))
    tallies = []
    for code, group in groups:
        dice = [_mean_dice(row) for row in group]
        tallies.append(WarningTally(code, len(group), sum(d < poor for d in dice),
                                    float(np.mean(dice)) if dice else math.nan))
    return tallies


def print_warning_tallies(tallies: list[WarningTally], poor: float, stream: TextIO = sys.stdout) -> None:
    """`tally_warnings`'s answer as a table."""
    print(f"warnings from the predict report (poor: mean Dice under {poor:g}):", file=stream)
    print("| warning | cases | poor | mean Dice |", file=stream)
    print("|---|---|---|---|", file=stream)
    for tally in tallies:
        dice = "-" if math.isnan(tally.mean_dice) else f"{tally.mean_dice:.4f}"
        print(f"| {tally.code or '(none)'} | {tally.cases} | {tally.poor} | {dice} |", file=stream)


def _mean_dice(row: dict) -> float:
    return float(np.mean([row[f"dice_{region}"] for region in REGIONS]))


def mean_row(rows: list[dict]) -> dict:
    """Every column's mean; NaN (a case without a confidence) is left out of it."""
    keys = [k for k in rows[0] if k != "case"]
    return {"case": "mean", **{k: _mean([r[k] for r in rows]) for k in keys}}


def _mean(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return float(np.mean(known)) if known else math.nan


def print_table(rows: list[dict], stream: TextIO = sys.stdout) -> None:
    """Dice and HD95 per region, legacy then lesion-wise, per case and their mean."""
    header = ["case"] + [f"{m}_{r}" for m in ("dice", "hd95", "lesion_dice", "lesion_hd95") for r in REGIONS]
    header += ["confidence"] if "confidence" in rows[0] else []
    print("| " + " | ".join(header) + " |", file=stream)
    print("|" + "---|" * len(header), file=stream)
    for row in rows + [mean_row(rows)]:
        cells = [row["case"]] + [_cell(h, row[h]) for h in header[1:]]
        print("| " + " | ".join(cells) + " |", file=stream)


def _cell(column: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if "hd95" in column or column == "confidence" else f"{value:.4f}"


def lesion_rules_line(counts: dict[str, int]) -> str:
    """Which challenges' lesion-wise rules scored how many cases, with their settings."""
    used = [f"{name} for {n} case(s) (dilation {LESION_RULES[name].dilation}, lesions of at most "
            f"{LESION_RULES[name].max_ignored_mm3:g} mm3 left out)" for name, n in sorted(counts.items())]
    return "lesion-wise scores by BraTS 2023's rules: " + "; ".join(used)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    all_rows = rows + [mean_row(rows)]
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)


def evaluate_folder(pred_dir: Path, gt_dir: Path, csv_path: Path | None, labels: str, qc_dir: Path | None,
                    lesion_rule: str = AUTO_LESION_RULE, predict_report: Path | None = None,
                    poor: float = POOR_DICE, recoding: TruthRecoding | None = None) -> int:
    """CLI body: prints the table (with ``predict_report``'s confidence per case and how it tracked the Dice),
    writes the CSV (and QC pictures); exit 0, 1 when some case or file had a problem (each listed; the others
    are scored), or 2 on unusable input."""
    try:
        if not 0 < poor <= 1:
            raise ValueError(f"--poor must be in (0, 1], got {poor}")
        if csv_path is not None:  # checked first: a table that cannot be saved is found before scoring
            writable_file(Path(csv_path), "--csv")
        if qc_dir is not None:
            writable_folder(Path(qc_dir), "--qc folder")
        report = None if predict_report is None else read_predict_report(predict_report)
        result = evaluate_cases(pred_dir, gt_dir, labels, qc_dir, lesion_rule, recoding)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    if result.rows and len(result.missing) == len(result.rows):  # a wrong --pred folder, not a result of 0
        print(f"error: no prediction in {pred_dir} matches a case under {gt_dir}", file=sys.stderr)
        return 2
    if result.rows:
        if report is not None:
            join_confidence(result.rows, report)
        print_table(result.rows)
        print(lesion_rules_line(result.lesion_rules))
        if report is not None:
            print(check_confidence(result.rows, poor).line())
            print_warning_tallies(tally_warnings(result.rows, report, poor), poor)
        if csv_path is not None:
            write_csv(result.rows, csv_path)
    if result.missing:
        print(f"missing predictions (scored as empty): {', '.join(result.missing)}", file=sys.stderr)
    if result.unmatched:  # a misnamed or absent ground truth (BraTS 2020's case 355) would leave it unseen
        print(f"predictions without a ground truth (not scored): {', '.join(result.unmatched)}", file=sys.stderr)
    return 1 if result.problems else 0
