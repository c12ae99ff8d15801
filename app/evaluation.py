"""The evaluate job: BraTS metrics of a prediction folder against cases with ground truth."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TextIO

import numpy as np
import SimpleITK as sitk

from .conventions import AUTO_LABELS, from_file_labels
from .io import (
    CaseError,
    find_cases,
    geometry_difference,
    load_segmentation,
    read_image,
    writable_file,
    writable_folder,
)
from .metrics import REGIONS, case_scores

METRICS = ("dice", "hd95", "sensitivity", "specificity", "ppv")


def _file_labels_to_internal(labels: np.ndarray, convention: str, where: str) -> np.ndarray:
    allowed = {"2018": {0, 1, 2, 4}, "2023": {0, 1, 2, 3}}.get(convention)
    if allowed is not None:
        extra = set(np.unique(labels).tolist()) - allowed
        if extra:
            raise ValueError(f"{where}: labels {sorted(extra)} are not in the BraTS {convention} convention")
    try:
        return from_file_labels(labels)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def evaluate_cases(pred_dir: Path, gt_dir: Path, labels: str = AUTO_LABELS) -> tuple[list[dict], list[str]]:
    """Rows of per-case metrics and the IDs whose prediction was missing (scored as empty)."""
    found = find_cases(gt_dir)
    cases = [c for c in found.cases if c.segmentation is not None]
    if not cases:
        raise ValueError(f"no case with a ground-truth segmentation under {gt_dir}")
    rows, missing = [], []
    for case in cases:
        truth_image = read_image(case.segmentation, case.case_id)
        truth = _file_labels_to_internal(load_segmentation(case), labels, str(case.segmentation))
        pred_path = Path(pred_dir) / f"{case.case_id}.nii.gz"
        if pred_path.is_file():
            pred_image = read_image(pred_path, case.case_id)
            difference = geometry_difference(pred_image, truth_image)
            if difference is not None:
                raise CaseError(case.case_id, pred_path,
                                f"prediction geometry differs from the ground truth: {difference}")
            pred = _file_labels_to_internal(sitk.GetArrayFromImage(pred_image), labels, str(pred_path))
        else:
            missing.append(case.case_id)
            pred = np.zeros_like(truth)
        spacing = tuple(reversed(truth_image.GetSpacing()))  # array order z, y, x
        scores = case_scores(pred, truth, spacing)
        row = {"case": case.case_id}
        for region in REGIONS:
            for metric in METRICS:
                row[f"{metric}_{region}"] = getattr(scores[region], metric)
        rows.append(row)
    return rows, missing


def mean_row(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "case"]
    return {"case": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in keys}}


def print_table(rows: list[dict], stream: TextIO = sys.stdout) -> None:
    header = ["case"] + [f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS]
    print("| " + " | ".join(header) + " |", file=stream)
    print("|" + "---|" * len(header), file=stream)
    for row in rows + [mean_row(rows)]:
        cells = [row["case"]] + [f"{row[h]:.4f}" if h.startswith("dice") else f"{row[h]:.2f}" for h in header[1:]]
        print("| " + " | ".join(cells) + " |", file=stream)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    all_rows = rows + [mean_row(rows)]
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)


def evaluate_folder(pred_dir: Path, gt_dir: Path, csv_path: Path | None, labels: str, qc_dir: Path | None) -> int:
    """CLI body: prints the table, writes the CSV (and QC pictures); exit 0, or 2 on unusable input."""
    try:
        if csv_path is not None:  # checked first: a table that cannot be saved is found before scoring
            writable_file(Path(csv_path), "--csv")
        if qc_dir is not None:
            writable_folder(Path(qc_dir), "--qc folder")
        rows, missing = evaluate_cases(pred_dir, gt_dir, labels)
    except (ValueError, OSError, CaseError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rows and len(missing) == len(rows):  # nothing to score: a wrong --pred folder, not a result of 0
        print(f"error: no prediction in {pred_dir} matches a case under {gt_dir}", file=sys.stderr)
        return 2
    print_table(rows)
    if missing:
        print(f"missing predictions (scored as empty): {', '.join(missing)}", file=sys.stderr)
    if csv_path is not None:
        write_csv(rows, csv_path)
    if qc_dir is not None:
        from .qc import save_evaluation_pictures

        save_evaluation_pictures(pred_dir, gt_dir, qc_dir)
    return 0
