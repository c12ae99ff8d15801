"""The paper's Table I on phantoms: train each row's single model, score it on held-out phantoms.

Rows: MC3 (three-model cascade), OM-Net0 (no curriculum, no transfer), OM-Net, OM-Net + SE, OM-Net + CGA,
OM-Net + CGA + post-processing. Each row trains fold 0 of a k-fold split (a single model, as in Table I),
for each seed, with the same steps; prints parameter counts (conv/deconv weights) and mean WT/TC/ET Dice.

    python3 -m app phantoms --out data/abl_train --n 50 --seed 11 --size 128,128,80
    python3 -m app phantoms --out data/abl_heldout --n 20 --seed 12 --size 128,128,80
    python3 benchmarks/ablation.py --data data/abl_train --heldout data/abl_heldout --out runs/ablation \
        --width 8 --stage-steps 50,50,1400 --seeds 0,1 --jobs 2 \
        --second-seed-rows "OM-Net + CGA,OM-Net + CGA + post" \
        --train-args "--batch 6 --lr 1e-2 --momentum 0.9 --lr-halve-every 500 --validate-every 250 \
                      --val-cases 4 --cache data/abl_cache"

Training runs go ``--jobs`` at a time, each with an equal share of the CPU threads; rerunning the command
reuses finished runs and predictions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = [  # (name, train variant, extra train flags, post-processing)
    ("MC3 (cascade)", "cascade", [], False),
    ("OM-Net0", "omnet", ["--no-curriculum", "--no-transfer"], False),
    ("OM-Net", "omnet", [], False),
    ("OM-Net + SE", "omnet_se", [], False),
    ("OM-Net + CGA", "omnet_cga", [], False),
    ("OM-Net + CGA + post", "omnet_cga", [], True),
]


def _run(args: list[str], threads: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    threads_flag = ["--threads", str(threads)] if threads else []
    result = subprocess.run([sys.executable, "-m", "app", *args, *threads_flag], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{result.stderr[-2000:]}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="training phantoms (with ground truth)")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out phantoms never used in training")
    parser.add_argument("--out", type=Path, required=True, help="working folder (weights, predictions, results)")
    parser.add_argument("--width", type=int, default=8, help="network width for every row")
    parser.add_argument("--stage-steps", default="50,50,600", help="curriculum steps (OM-Net0 uses their sum)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the spread shows the noise")
    parser.add_argument("--train-args", default="--batch 6 --lr 1e-2 --momentum 0.9 --lr-halve-every 300",
                        help="extra flags for every training run")
    parser.add_argument("--second-seed-rows", default=None,
                        help="comma-separated row names that use every seed (default: all rows); the others "
                             "use the first seed only")
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel (threads split evenly)")
    args = parser.parse_args()

    from app.cli import cpu_quota

    seeds = args.seeds.split(",")
    spread = None if args.second_seed_rows is None else set(args.second_seed_rows.split(","))
    unknown = (spread or set()) - {name for name, *_ in ROWS}
    if unknown:
        parser.error(f"unknown rows in --second-seed-rows: {sorted(unknown)}")
    threads = max(1, cpu_quota() // max(1, args.jobs))
    runs = [(name, variant, flags, post, seed) for name, variant, flags, post in ROWS
            for seed in (seeds if spread is None or name in spread else seeds[:1])]

    def tag_of(variant: str, flags: list[str], seed: str) -> str:
        return f"{variant}{'-'.join([''] + [f.strip('-') for f in flags])}-s{seed}"

    def train(run) -> None:
        _, variant, flags, _, seed = run
        weights = args.out / "weights" / tag_of(variant, flags, seed)
        if not (weights / "manifest.json").exists():
            _run(["train", "--data", str(args.data), "--out", str(weights), "--variant", variant,
                  "--width", str(args.width), "--folds", "5", "--fold", "0", "--stage-steps", args.stage_steps,
                  "--seed", seed, "--quiet", *args.train_args.split(), *flags], threads)

    trainings = {tag_of(v, f, seed): (n, v, f, p, seed) for n, v, f, p, seed in runs}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(train, trainings.values()))

    results = [_score(args, name, variant, flags, post, seed, tag_of(variant, flags, seed))
               for name, variant, flags, post, seed in runs]
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2))
    _print_table(results)
    return 0


def _score(args: argparse.Namespace, name: str, variant: str, flags: list[str], post: bool, seed: str,
           tag: str) -> dict:
    """Predict the held-out cases with one trained row and read its mean Dice."""
    from app.model import build_model, conv_weight_count

    weights = args.out / "weights" / tag
    pred = args.out / "pred" / f"{tag}{'-post' if post else ''}"
    _run(["predict", "--input", str(args.heldout), "--output", str(pred), "--weights", str(weights),
          "--quiet", "--skip-existing", *([] if post else ["--no-postprocess"])])
    csv_path = args.out / "csv" / f"{pred.name}.csv"
    _run(["evaluate", "--pred", str(pred), "--gt", str(args.heldout), "--csv", str(csv_path)])
    with csv_path.open(newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["case"] == "mean")
    return {"row": name, "seed": seed, "params": conv_weight_count(build_model(variant, args.width)),
            **{r: float(row[f"dice_{r}"]) for r in ("WT", "TC", "ET")}}


def _print_table(results: list[dict]) -> None:
    print("| model | conv weights | seeds | WT | TC | ET |\n|---|---|---|---|---|---|")
    for name, *_ in ROWS:
        rows = [r for r in results if r["row"] == name]
        cells = []
        for region in ("WT", "TC", "ET"):
            values = [r[region] for r in rows]
            spread = f" ± {max(values) - min(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{sum(values) / len(values):.3f}{spread}")
        print(f"| {name} | {rows[0]['params']:,} | {len(rows)} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    sys.exit(main())
