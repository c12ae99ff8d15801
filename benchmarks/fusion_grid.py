"""The region fusion's thresholds, measured on cases with ground truth.

For every case the product's own path runs once (N4 outside the tumour scout, the whole ensemble of
``--weights``, fast tiling); then its fold-averaged probabilities are fused with each setting of
`app.fusion.FusionThresholds` in ``SETTINGS`` (task 1's fusion region unchanged), post-processed with the
defaults and scored (Dice WT, TC, ET). One JSON line per case goes to ``--jsonl`` (a case already there is
skipped, so a killed run resumes); the table is printed from every line in the file(s), with how many cases
each setting moved by more than 0.01 either way.

    python3 benchmarks/fusion_grid.py --input DIR --jsonl OUT.jsonl [--weights weights] [--threads N]
    python3 benchmarks/fusion_grid.py --summary OUT.jsonl [MORE.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.conventions import Modality, from_file_labels  # noqa: E402
from app.fusion import FusionThresholds, fuse  # noqa: E402
from app.inference import EnsemblePredictor  # noqa: E402
from app.io import find_cases, load_case, load_segmentation  # noqa: E402
from app.metrics import region_dice  # noqa: E402
from app.options import BiasCorrection  # noqa: E402
from app.pipeline import predict_corrected  # noqa: E402
from app.postprocess import PostprocessConfig, postprocess  # noqa: E402
from app.preprocess import brain_mask  # noqa: E402
from app.weights import load_ensemble  # noqa: E402

REGIONS = ("WT", "TC", "ET")
DEFAULT = "default (0.5 / 0.5 / 0.5)"
SETTINGS = {
    DEFAULT: FusionThresholds(),
    "tumour 0.4": FusionThresholds(tumour=0.4),
    "tumour 0.6": FusionThresholds(tumour=0.6),
    "tumour 0.7": FusionThresholds(tumour=0.7),
    "core 0.4": FusionThresholds(core=0.4),
    "core 0.6": FusionThresholds(core=0.6),
    "core 0.7": FusionThresholds(core=0.7),
    "enhancing 0.4": FusionThresholds(enhancing=0.4),
    "enhancing 0.6": FusionThresholds(enhancing=0.6),
    "tumour 0.6, core 0.6": FusionThresholds(tumour=0.6, core=0.6),
    "tumour 0.7, core 0.6": FusionThresholds(tumour=0.7, core=0.6),
}


def analyse_case(case, predictor: EnsemblePredictor) -> dict:
    loaded = load_case(case)
    truth = from_file_labels(load_segmentation(case, loaded.reference))
    names = [m.value for m in case.modalities]
    corrected, prediction = predict_corrected(predictor, loaded.image, BiasCorrection.N4, names)
    row: dict = {"case": case.case_id, "scores": {}}
    if prediction.box is None:
        raise ValueError(f"{case.case_id}: empty brain")
    box = prediction.box
    brain = brain_mask(corrected)[box]
    t1c = corrected[names.index(Modality.T1C.value)][box]
    for name, thresholds in SETTINGS.items():
        labels = (fuse(prediction.probabilities, prediction.region, predictor.fusion, thresholds) * brain)
        labels = postprocess(labels.astype(np.uint8), t1c, PostprocessConfig())
        # Tumour outside the brain crop counts as missed: score over the whole volume.
        whole = np.zeros(truth.shape, np.uint8)
        whole[box] = labels
        dice = region_dice(whole, truth)
        row["scores"][name] = [round(dice[r], 4) for r in REGIONS]
    return row


def summary(paths: list[Path]) -> None:
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        print("no cases")
        return
    base = np.array([row["scores"][DEFAULT] for row in rows])
    print(f"{len(rows)} case(s); in brackets, cases whose mean Dice rose / fell by more than 0.01\n")
    print("| fusion thresholds | WT | TC | ET | mean | moved |\n|---|---|---|---|---|---|")
    for name in SETTINGS:
        if not all(name in row["scores"] for row in rows):
            continue
        scores = np.array([row["scores"][name] for row in rows])
        change = scores.mean(axis=1) - base.mean(axis=1)
        mean = scores.mean(axis=0)
        print(f"| {name} | {mean[0]:.4f} | {mean[1]:.4f} | {mean[2]:.4f} | {mean.mean():.4f} "
              f"| {int((change > 0.01).sum())} / {int((change < -0.01).sum())} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="folder of cases with ground truth (e.g. held-out phantoms)")
    parser.add_argument("--jsonl", type=Path, help="per-case results, appended (cases already there are skipped)")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights",
                        help="the ensemble measured (default: weights/)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--summary", type=Path, nargs="+", help="only print the table from these JSONL files")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
        return 0
    if args.input is None or args.jsonl is None:
        parser.error("--input and --jsonl are required unless --summary is given")
    if args.threads:
        torch.set_num_threads(args.threads)
    done = set()
    if args.jsonl.exists():
        done = {json.loads(line)["case"] for line in args.jsonl.read_text().splitlines() if line.strip()}
    predictor = EnsemblePredictor(device="cpu").load_models(load_ensemble(args.weights)[1])
    for case in find_cases(args.input).cases:
        if case.case_id in done:
            continue
        clock = time.perf_counter()
        row = analyse_case(case, predictor)
        with args.jsonl.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(f"{case.case_id}: {time.perf_counter() - clock:.0f} s", file=sys.stderr, flush=True)
    summary([args.jsonl])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
