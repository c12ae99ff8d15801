"""Voxel sizes other than BraTS's 1 mm: held-out phantoms re-gridded, segmented by the product under each
`--resample` mode, scored on their own grids.

Each phantom (generator 2, a series never trained on; or the first cases of any 1 mm folder with ground
truth, `--data`) is re-gridded to every voxel size asked for over the same field of view: images trilinear,
ground truth nearest neighbour, voxel centres in their physical places. Every folder goes through `python3 -m
app predict` under each `--resample` mode of `--modes` (default `auto` and `off`) and `python3 -m app
evaluate` against its own ground truth, as a user would run them. Prints a Markdown table of mean Dice (WT,
TC, ET) and seconds per case per voxel size and mode.

    python3 benchmarks/voxel_sizes.py --work DIR [--weights weights] [--cases 4] [--seed 25 | --data DIR]
        [--spacings 0.7,0.7,0.7/0.5,0.5,1/1,1,3] [--modes auto,off] [--size 240,240,155] [--folds 0,1,...]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.options import Resampling, choices  # noqa: E402

MODES = tuple(choices(Resampling))
LABEL_SUFFIXES = ("-seg.nii.gz", "_seg.nii.gz")


def spacing_list(text: str) -> list[tuple[float, float, float]]:
    """``X,Y,Z/X,Y,Z/...`` voxel sizes in mm, each positive."""
    sizes = []
    for item in text.split("/"):
        values = tuple(float(v) for v in item.split(","))
        if len(values) != 3 or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"a voxel size is three positive mm values X,Y,Z, got {item!r}")
        sizes.append(values)
    return sizes


def mode_list(text: str) -> tuple[str, ...]:
    """Comma-separated `--resample` modes, each one the product knows."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return modes


def link_first_cases(data: Path, target: Path, count: int) -> None:
    """``target`` holding one folder per case, of links to the files of the first ``count`` cases with ground
    truth under ``data`` (by ID; any layout predict reads). ValueError when ``data`` holds none."""
    from agreement import folder_cases

    for case in folder_cases(data, count):
        (target / case.case_id).mkdir(parents=True)
        for path in (*case.modalities.values(), case.segmentation):
            (target / case.case_id / path.name).symlink_to(path.resolve())


def regrid_image(image: sitk.Image, spacing: tuple[float, float, float], label: bool) -> sitk.Image:
    """``image`` on voxels of ``spacing`` mm over the same field of view (voxel centres in place)."""
    size = [max(1, round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    origin = [o + (t - s) / 2 for o, s, t in zip(image.GetOrigin(), image.GetSpacing(), spacing)]
    reference = sitk.Image(size, image.GetPixelID())
    reference.SetSpacing(spacing)
    reference.SetOrigin(origin)
    reference.SetDirection(image.GetDirection())
    source = image if label else sitk.Cast(image, sitk.sitkFloat32)
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(source, reference, sitk.Transform(), interpolator, 0.0, source.GetPixelID())


def regrid_folder(source: Path, target: Path, spacing: tuple[float, float, float]) -> None:
    for case in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / case.name).mkdir(parents=True, exist_ok=True)
        for path in case.iterdir():
            image = regrid_image(sitk.ReadImage(str(path)), spacing, path.name.endswith(LABEL_SUFFIXES))
            sitk.WriteImage(image, str(target / case.name / path.name), True)


def _app(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"python3 -m app {args[0]} failed ({result.returncode}):\n{result.stderr[-2000:]}")


def score(cases: Path, out: Path, mode: str, predict_flags: list[str]) -> dict[str, float]:
    """Mean Dice per region and seconds per case of the product on ``cases`` with ``--resample mode``."""
    # Beside the folder, named after all of it: with_suffix would cut "pred-0.7_0.7_0.7-auto" at its last
    # dot, and the modes of one voxel size would share one report.
    report, table = out.parent / f"{out.name}.json", out.parent / f"{out.name}.csv"
    _app("predict", "--input", str(cases), "--output", str(out), "--resample", mode, "--quiet", "--report",
         str(report), *predict_flags)
    _app("evaluate", "--pred", str(out), "--gt", str(cases), "--csv", str(table))
    rows = [r for r in csv.DictReader(open(table)) if r["case"] != "mean"]
    seconds = [c["seconds"] for c in json.loads(report.read_text())["cases"]]
    return {**{region: float(np.mean([float(r[f"dice_{region}"]) for r in rows])) for region in ("WT", "TC", "ET")},
            "seconds": float(np.mean(seconds)), "cases": len(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the phantoms and predictions")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="weights folder to score")
    parser.add_argument("--cases", type=int, default=4, help="held-out phantoms")
    parser.add_argument("--seed", type=int, default=25, help="phantom series seed (25: never trained on)")
    parser.add_argument("--spacings", type=spacing_list, default=spacing_list("0.7,0.7,0.7/0.5,0.5,1/1,1,3"),
                        help="voxel sizes X,Y,Z in mm, separated by /")
    parser.add_argument("--size", default="240,240,155", help="phantom size X,Y,Z at 1 mm")
    parser.add_argument("--folds", default=None, help="folds to ensemble (default: all)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a 1 mm folder of cases with ground truth, one folder per case (another generator's, "
                             "a BraTS training folder): its first --cases cases instead of generated phantoms")
    parser.add_argument("--modes", type=mode_list, default=("auto", "off"),
                        help=f"--resample modes to run on each re-gridded folder, comma-separated ({', '.join(MODES)})")
    args = parser.parse_args(argv)
    flags = ["--weights", str(args.weights), *(["--folds", args.folds] if args.folds else [])]
    source = args.work / "1mm"
    if not source.is_dir():
        if args.data is None:
            _app("phantoms", "--out", str(source), "--n", str(args.cases), "--seed", str(args.seed),
                 "--size", args.size)
        else:
            try:
                link_first_cases(args.data, source, args.cases)
            except ValueError as err:
                parser.error(f"--data: {err}")
    rows = [("1 x 1 x 1", "(as generated)", score(source, args.work / "pred-1mm", "auto", flags))]
    for spacing in args.spacings:
        name = " x ".join(f"{s:g}" for s in spacing)
        folder = args.work / name.replace(" x ", "_")
        if not folder.is_dir():
            regrid_folder(source, folder, spacing)
        for mode in args.modes:
            result = score(folder, args.work / f"pred-{folder.name}-{mode}", mode, flags)
            rows.append((name, f"`--resample {mode}`", result))
    origin = f"series seed {args.seed}" if args.data is None else f"from {args.data}"
    print(f"{rows[0][2]['cases']} held-out cases, {origin}, re-gridded; mean Dice on their own grids")
    print("| voxels (mm) | mode | Dice WT | TC | ET | s per case |")
    print("|---|---|---|---|---|---|")
    for name, mode, result in rows:
        print(f"| {name} | {mode} | {result['WT']:.4f} | {result['TC']:.4f} | {result['ET']:.4f} | "
              f"{result['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
