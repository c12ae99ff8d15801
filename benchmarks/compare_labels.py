"""Agreement of two folders of label maps written by `predict` (e.g. GPU against CPU, or two GPU runs).

    python3 benchmarks/compare_labels.py A B

Prints a Markdown table: per case, whether the files are byte-identical, whether the label arrays are
identical, and the Dice of WT, TC and ET between the two; then the mean. Exit status 1 when a case is in
one folder only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def compare(a: Path, b: Path) -> tuple[list[dict], list[str]]:
    import SimpleITK as sitk

    from app.conventions import LabelConvention
    from app.metrics import region_dice

    names_a = {p.name for p in a.glob("*.nii*")}
    names_b = {p.name for p in b.glob("*.nii*")}
    rows = []
    for name in sorted(names_a & names_b):
        x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name))) for folder in (a, b))
        # Either ET code (3 or 4) reads the same: region_dice takes internal labels.
        internal = [np.where(v == LabelConvention.BRATS2018.enhancing_label, 3, v) for v in (x, y)]
        dice = region_dice(*internal)
        rows.append({"case": name.split(".")[0], "same bytes": (a / name).read_bytes() == (b / name).read_bytes(),
                     "same labels": bool(np.array_equal(x, y)), **dice})
    missing = sorted(names_a ^ names_b)
    return rows, missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="first folder of <ID>.nii.gz label maps")
    parser.add_argument("b", type=Path, help="second folder")
    args = parser.parse_args()
    rows, missing = compare(args.a, args.b)
    print(f"{args.a} vs {args.b}: {len(rows)} case(s) in both\n")
    print("| case | same bytes | same labels | WT | TC | ET |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dice = " | ".join(f"{r[k]:.4f}" for k in ("WT", "TC", "ET"))
        print(f"| {r['case']} | {r['same bytes']} | {r['same labels']} | {dice} |")
    if rows:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("WT", "TC", "ET")}
        print(f"| mean ({sum(r['same bytes'] for r in rows)} byte-identical, {sum(r['same labels'] for r in rows)} "
              f"label-identical) | | | {mean['WT']:.4f} | {mean['TC']:.4f} | {mean['ET']:.4f} |")
    for name in missing:
        print(f"only in one folder: {name}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
