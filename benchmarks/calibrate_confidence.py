"""Calibrate the low-confidence threshold on case-level rows that hold a confidence and real Dice scores.

    python3 benchmarks/calibrate_confidence.py sweep.csv [more.csv ...] [--poor 0.7]

Input: CSV files with columns WT, TC, ET and confidence, one row per case (or case-condition), as
`benchmarks/ood_sweep.py --csv` writes them, or the per-case CSV of `python3 -m app evaluate --predict-report
report.json --csv rows.csv` (your own labelled cases, with the report `predict --report` wrote for them). A
case is *poor* when its mean Dice over WT, TC and ET is below ``--poor``. For each candidate threshold the
table gives how many cases the warning flags, how many poor cases it catches (sensitivity), how many good
cases it leaves alone (specificity), and the mean Dice of the flagged and unflagged cases; the threshold with
the highest Youden index (sensitivity + specificity - 1) is printed last: that is the value
`app.confidence.LOW_CONFIDENCE` should hold.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def sweep_rows(paths: list[Path]) -> list[dict]:
    """Every row of the `ood_sweep.py --csv` files, in file order, numbers as floats (factor and strength
    stay text)."""
    rows = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append({k: v if k in ("factor", "strength") else float(v) for k, v in row.items()})
    return rows


def read_rows(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, mean Dice) per row of every file: the sweep's (columns WT, TC, ET) or `evaluate
    --predict-report --csv`'s (dice_WT, dice_TC, dice_ET; its mean row and cases without a confidence left
    out)."""
    confidence, dice = [], []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                columns = ("WT", "TC", "ET") if "WT" in row else ("dice_WT", "dice_TC", "dice_ET")
                if row.get("case") == "mean" or np.isnan(float(row["confidence"])):
                    continue
                confidence.append(float(row["confidence"]))
                dice.append(np.mean([float(row[c]) for c in columns]))
    return np.array(confidence), np.array(dice)


def threshold_rows(confidence: np.ndarray, dice: np.ndarray, poor: float) -> list[dict]:
    bad = dice < poor
    rows = []
    # Candidates halfway between consecutive confidences (and below / above them all), rounded to 3 decimals:
    # the value written into the code flags exactly the cases the table says.
    values = np.unique(confidence)
    candidates = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-3]])
    for threshold in np.unique(np.round(candidates, 3)):
        flagged = confidence < threshold
        sensitivity = float((flagged & bad).sum() / max(bad.sum(), 1))
        specificity = float((~flagged & ~bad).sum() / max((~bad).sum(), 1))
        rows.append({"threshold": float(threshold), "flagged": int(flagged.sum()), "sensitivity": sensitivity,
                     "specificity": specificity, "youden": sensitivity + specificity - 1,
                     "dice flagged": float(dice[flagged].mean()) if flagged.any() else float("nan"),
                     "dice unflagged": float(dice[~flagged].mean()) if (~flagged).any() else float("nan")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, nargs="+",
                        help="CSV files with WT, TC, ET (or dice_WT, dice_TC, dice_ET) and confidence columns")
    parser.add_argument("--poor", type=float, default=0.7, help="mean Dice below which a case needs review")
    args = parser.parse_args()
    confidence, dice = read_rows(args.csv)
    rows = threshold_rows(confidence, dice, args.poor)
    print(f"{len(dice)} cases, {int((dice < args.poor).sum())} poor (mean Dice < {args.poor}); "
          f"Pearson r(confidence, Dice) = {np.corrcoef(confidence, dice)[0, 1]:.2f}\n")
    print("| threshold | flagged | sensitivity | specificity | mean Dice flagged | mean Dice unflagged |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']:.3f} | {r['flagged']} | {r['sensitivity']:.2f} | {r['specificity']:.2f} | "
              f"{r['dice flagged']:.3f} | {r['dice unflagged']:.3f} |")
    best = max(rows, key=lambda r: (r["youden"], -r["flagged"]))
    print(f"\nbest threshold (Youden {best['youden']:.2f}): {best['threshold']:.3f} flags {best['flagged']} of "
          f"{len(dice)} cases, catches {best['sensitivity']:.0%} of the poor ones, leaves "
          f"{best['specificity']:.0%} of the good ones unflagged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
