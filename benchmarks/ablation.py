"""The paper's Table I on phantoms: train each row's single model, score it on held-out phantoms.

Rows: MC3 (three-model cascade), OM-Net0 (no curriculum, no transfer), OM-Net, OM-Net + SE, OM-Net + CGA,
OM-Net + CGA + post-processing. Each row trains fold 0 of a k-fold split (a single model, as in Table I),
for each seed, with the same steps; prints parameter counts (conv/deconv weights) and mean WT/TC/ET Dice.

    python benchmarks/ablation.py --data data/train --heldout data/heldout --out runs/ablation \
        --width 8 --stage-steps 50,50,600 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def _run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True)
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
    args = parser.parse_args()

    from app.model import Cascade, build_model, conv_weight_count

    results = []
    for name, variant, flags, post in ROWS:
        params = conv_weight_count(Cascade(args.width) if variant == "cascade" else build_model(variant, args.width))
        for seed in args.seeds.split(","):
            tag = f"{variant}{'-'.join([''] + [f.strip('-') for f in flags])}-s{seed}"
            weights = args.out / "weights" / tag
            if not (weights / "manifest.json").exists():
                _run(["train", "--data", str(args.data), "--out", str(weights), "--variant", variant,
                      "--width", str(args.width), "--folds", "5", "--fold", "0", "--stage-steps", args.stage_steps,
                      "--seed", seed, "--quiet", *args.train_args.split(), *flags])
            pred = args.out / "pred" / f"{tag}{'-post' if post else ''}"
            _run(["predict", "--input", str(args.heldout), "--output", str(pred), "--weights", str(weights),
                  "--quiet", "--skip-existing", *([] if post else ["--no-postprocess"])])
            csv_path = args.out / "csv" / f"{pred.name}.csv"
            _run(["evaluate", "--pred", str(pred), "--gt", str(args.heldout), "--csv", str(csv_path)])
            mean = [line for line in csv_path.read_text().splitlines() if line.startswith("mean,")][0].split(",")
            header = csv_path.read_text().splitlines()[0].split(",")
            row = dict(zip(header, mean))
            results.append({"row": name, "seed": seed, "params": params,
                            **{r: float(row[f"dice_{r}"]) for r in ("WT", "TC", "ET")}})
    (args.out / "ablation.json").write_text(json.dumps(results, indent=2))
    print("| model | conv weights | seeds | WT | TC | ET |\n|---|---|---|---|---|---|")
    for name, *_ in ROWS:
        rows = [r for r in results if r["row"] == name]
        cells = []
        for region in ("WT", "TC", "ET"):
            values = [r[region] for r in rows]
            spread = f" ± {max(values) - min(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{sum(values) / len(values):.3f}{spread}")
        print(f"| {name} | {rows[0]['params']:,} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
