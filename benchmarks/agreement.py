"""Tilings against the paper's overlap-tile on several phantom cases; prints a Markdown table.

The speed benchmark measures agreement on one case; this script shows how much that number moves from case
to case. For each case it runs the paper tiling and every other TILING token (benchmark.py's tokens) with
the same weights, applies the default post-processing, and reports each tiling's mask agreement with the
paper tiling and every tiling's Dice against the ground truth; the "raw" columns are the agreement of the
fused labels before any post-processing, which tells the network's own instability from what
post-processing adds to it (a step that switches on in one tiling and not the other moves a whole region).

    python3 benchmarks/agreement.py [--cases 4] [--seed 1000] [--ranges training|wide|mixed]
        [--data DIR] [--tilings fast,fastfixed] [--weights DIR] [--tta none|folds|full]

`--ranges wide` draws the phantoms outside the training ranges (the phantoms command's `--ranges`): where
the network is unsure, tile borders move the mask most, so agreement there is the harder number. `--data`
measures on the cases with ground truth in a folder instead (a BraTS training folder, or
benchmarks/signal_phantoms.py's cases), the first `--cases` of them by ID when given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark import predictor_options  # noqa: E402

from app.options import Mirroring, PhantomPreset, choices  # noqa: E402

REGIONS = ("WT", "TC", "ET")


def case_rows(case, models, tilings: list[str], device: str, precision: str, tta: str = "none") -> list[dict]:
    """One row per tiling (paper first), every tiling under the same ``tta``: agreement with paper (after the
    default post-processing, and raw) and Dice against the truth."""
    from app.conventions import from_file_labels
    from app.inference import EnsemblePredictor
    from app.io import load_case, load_segmentation
    from app.metrics import region_dice
    from app.options import BiasCorrection
    from app.pipeline import complete_segmentation, predict_corrected
    from app.postprocess import PostprocessConfig

    loaded = load_case(case)
    truth = from_file_labels(load_segmentation(case, loaded.reference))
    masks, raw = {}, {}
    for tiling in ["paper", *tilings]:
        predictor = EnsemblePredictor(device=device, precision=precision, tta=tta, **predictor_options(tiling))
        predictor.load_models(models)
        corrected, prediction = predict_corrected(predictor, loaded.image, BiasCorrection.N4)
        masks[tiling] = complete_segmentation(prediction, corrected, PostprocessConfig()).labels
        raw[tiling] = prediction.labels
    rows = []
    for tiling, mask in masks.items():
        agreement = region_dice(mask, masks["paper"])
        raw_agreement = region_dice(raw[tiling], raw["paper"])
        accuracy = region_dice(mask, truth)
        rows.append({"case": case.case_id, "tiling": tiling,
                     **{f"vs paper {r}": agreement[r] for r in REGIONS},
                     **{f"raw vs paper {r}": raw_agreement[r] for r in REGIONS},
                     **{f"vs truth {r}": accuracy[r] for r in REGIONS}})
    return rows


def mean_rows(rows: list[dict], tilings: list[str]) -> list[dict]:
    means = []
    for tiling in ["paper", *tilings]:
        mine = [r for r in rows if r["tiling"] == tiling]
        means.append({"case": "mean", "tiling": tiling,
                      **{k: float(np.mean([r[k] for r in mine])) for k in mine[0] if k not in ("case", "tiling")}})
    return means


def phantom_cases(workdir: Path, cases: int, seed: int, preset: PhantomPreset,
                  size: tuple[int, int, int] | None = None) -> Path:
    """The folder of ``cases`` phantoms of series ``seed`` from ``preset``'s ranges under ``workdir``,
    generated unless a previous run left it there (full BraTS size unless ``size``)."""
    from app.phantoms import DEFAULT_SIZE, PhantomMix, generate

    size = size or DEFAULT_SIZE
    cases_dir = workdir / f"phantoms_{preset.value}_seed{seed}_n{cases}_{'x'.join(map(str, size))}"
    if not cases_dir.exists():
        generate(cases_dir, cases, seed=seed, size=size, mix=PhantomMix(preset))
    return cases_dir


def folder_cases(data: Path, limit: int | None = None) -> list:
    """The cases with ground truth under ``data`` (any layout predict reads), by ID, the first ``limit``."""
    from app.io import cases_with_ground_truth

    return sorted(cases_with_ground_truth(data), key=lambda c: c.case_id)[:limit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=None,
                        help="number of 240x240x155 phantom cases to generate (default 4); with --data, how many of "
                             "its cases to use (default all)")
    parser.add_argument("--data", type=Path, default=None,
                        help="measure on the cases with ground truth in this folder instead of generated phantoms")
    parser.add_argument("--seed", type=int, default=1000, help="phantom series seed")
    parser.add_argument("--ranges", default=PhantomPreset.TRAINING.value, choices=choices(PhantomPreset),
                        help="phantom ranges: training, wide (outside them) or mixed (the phantoms command's --ranges)")
    parser.add_argument("--tilings", default="fast,fastfixed",
                        help="comma-separated TILING tokens of benchmark.py to compare with paper")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: the shipped weights/)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="network arithmetic")
    parser.add_argument("--workdir", type=Path, default=None, help="where the phantoms go (default: temporary)")
    parser.add_argument("--tta", default="none", choices=choices(Mirroring),
                        help="test-time mirroring, the same for every tiling (predict's --tta)")
    args = parser.parse_args()
    if args.cases is not None and args.cases < 1:
        parser.error("--cases must be at least 1")
    tilings = [t for t in args.tilings.split(",") if t]
    for token in tilings:
        try:
            predictor_options(token)
        except ValueError as err:
            parser.error(f"--tilings: {err}")

    import tempfile

    import torch

    from app.cli import cpu_quota
    from app.weights import DEFAULT_WEIGHTS_DIR, load_ensemble

    torch.set_num_threads(cpu_quota())
    if args.data is not None:
        try:
            cases = folder_cases(args.data, args.cases)
        except (ValueError, OSError) as err:
            parser.error(f"--data: {err}")
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="omnet-agreement-"))
        cases = folder_cases(phantom_cases(workdir, args.cases or 4, args.seed, PhantomPreset(args.ranges)))
    _, models = load_ensemble(args.weights or DEFAULT_WEIGHTS_DIR, None)
    rows = []
    for case in cases:
        rows.extend(case_rows(case, models, tilings, args.device, args.precision, args.tta))
        print(f"{case.case_id} done", file=sys.stderr, flush=True)
    columns = ["case", "tiling", *(f"{kind} {r}" for kind in ("vs paper", "raw vs paper", "vs truth") for r in REGIONS)]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows + mean_rows(rows, tilings):
        print("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
