"""The region fusion's thresholds, measured on cases with ground truth.

For every case the product's own path runs once (N4 outside the tumour scout, the whole ensemble of
``--weights``, fast tiling); then its fold-averaged probabilities are fused with each setting of
`app.fusion.FusionThresholds` in ``SETTINGS`` (task 1's fusion region unchanged), post-processed with the
defaults and scored (Dice WT, TC, ET). One JSON line per case goes to ``--jsonl`` (a case already there is
skipped, so a killed run resumes); the table is printed from every line in the file(s), with how many cases
each setting moved by more than 0.01 either way. With ``--probabilities DIR`` each case's crop (fold-averaged
probabilities, fusion region, brain, corrected T1c, truth) is kept there as ``<ID>.npz`` and read back on a
later run instead of running the network again: a new grid over the same cases costs only the fusion and
the post-processing.

    python3 benchmarks/fusion_grid.py --input DIR --jsonl OUT.jsonl [--weights weights] [--threads N]
        [--probabilities DIR]
    python3 benchmarks/fusion_grid.py --summary OUT.jsonl [MORE.jsonl ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from case_rows import add_arguments, read_rows, score_cases, scores  # noqa: E402

from app.conventions import Modality, from_file_labels  # noqa: E402
from app.fusion import FusionThresholds, TaskProbabilities, fuse  # noqa: E402
from app.inference import EnsemblePredictor  # noqa: E402
from app.io import load_case, load_segmentation  # noqa: E402
from app.options import BiasCorrection  # noqa: E402
from app.pipeline import predict_corrected  # noqa: E402
from app.postprocess import PostprocessConfig  # noqa: E402
from app.preprocess import brain_mask  # noqa: E402
from app.weights import load_ensemble  # noqa: E402

DEFAULT = "default (0.5 / 0.5 / 0.5)"
SETTINGS = {
    DEFAULT: FusionThresholds(),
    "tumour 0.4": FusionThresholds(tumour=0.4),
    "tumour 0.6": FusionThresholds(tumour=0.6),
    "tumour 0.7": FusionThresholds(tumour=0.7),
    "core 0.4": FusionThresholds(core=0.4),
    "core 0.6": FusionThresholds(core=0.6),
    "core 0.7": FusionThresholds(core=0.7),
    "enhancing 0.3": FusionThresholds(enhancing=0.3),
    "enhancing 0.4": FusionThresholds(enhancing=0.4),
    "enhancing 0.6": FusionThresholds(enhancing=0.6),
    "tumour 0.4, enhancing 0.4": FusionThresholds(tumour=0.4, enhancing=0.4),
    "tumour 0.6, core 0.6": FusionThresholds(tumour=0.6, core=0.6),
    "tumour 0.7, core 0.6": FusionThresholds(tumour=0.7, core=0.6),
}


CROP_KEYS = {"tumour", "classes", "enhancing", "region", "brain", "t1c", "t1", "truth_crop", "truth_outside"}


def case_crop(case, predictor: EnsemblePredictor, store: Path | None) -> dict[str, np.ndarray]:
    """What the grid reads of a case, over its brain crop: the product's fold-averaged probabilities and
    fusion region, the brain, the corrected T1c and T1 and the truth; from ``store`` when kept there before
    (a crop kept before post-processing read T1 lacks it and is computed again)."""
    kept = None if store is None else store / f"{case.case_id}.npz"
    if kept is not None and kept.is_file():
        with np.load(kept) as arrays:
            if CROP_KEYS <= set(arrays.files):
                return dict(arrays)
    loaded = load_case(case)
    truth = from_file_labels(load_segmentation(case, loaded.reference))
    names = [m.value for m in case.modalities]
    corrected, prediction = predict_corrected(predictor, loaded.image, BiasCorrection.N4, names)
    if prediction.box is None:
        raise ValueError(f"{case.case_id}: empty brain")
    box = prediction.box
    p = prediction.probabilities
    crop = {"tumour": p.tumour, "classes": p.classes, "enhancing": p.enhancing, "region": prediction.region,
            "brain": brain_mask(corrected)[box], "t1c": corrected[names.index(Modality.T1C.value)][box],
            "t1": corrected[names.index(Modality.T1.value)][box],
            "truth_crop": truth[box], "truth_outside": np.array(int((truth > 0).sum() - (truth[box] > 0).sum()))}
    if kept is not None:
        store.mkdir(parents=True, exist_ok=True)
        partial = kept.with_suffix(".tmp.npz")
        np.savez_compressed(partial, **crop)
        partial.replace(kept)
    return crop


def analyse_case(case, predictor: EnsemblePredictor, store: Path | None = None) -> dict:
    crop = case_crop(case, predictor, store)
    if int(crop["truth_outside"]):
        raise ValueError(f"{case.case_id}: tumour outside the brain crop")
    p = TaskProbabilities(crop["tumour"], crop["classes"], crop["enhancing"])
    row: dict = {"case": case.case_id, "scores": {}}
    for name, thresholds in SETTINGS.items():
        labels = (fuse(p, crop["region"], predictor.fusion, thresholds) * crop["brain"]).astype(np.uint8)
        row["scores"][name] = scores(labels, crop["truth_crop"], crop["t1c"], PostprocessConfig(), p.tumour, crop["t1"])
    return row


def summary(paths: list[Path]) -> None:
    rows = read_rows(paths)
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
    add_arguments(parser, "the ensemble measured (default: weights/)")
    parser.add_argument("--probabilities", type=Path, default=None,
                        help="keep each case's crop here (about 80 MB) and reuse it on later runs")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
        return 0
    if args.input is None or args.jsonl is None:
        parser.error("--input and --jsonl are needed (or --summary FILES)")
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = EnsemblePredictor(device="cpu").load_models(load_ensemble(args.weights)[1])
    score_cases(args.input, args.jsonl, lambda case: analyse_case(case, predictor, args.probabilities))
    summary([args.jsonl])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
