"""What the ensemble's parts are worth, on cases with ground truth: each post-processing step, each fold, and
each candidate version of a fold.

For every case the product's own bias correction runs once (N4 outside the scout of ``--weights``); then every
fold of ``--weights`` and of each ``--candidate`` folder runs alone on that corrected image, on the fold's own
fast-tiling grid, and the script scores (Dice WT, TC, ET against the truth):

* the ensemble of ``--weights`` without post-processing, with all of it, and with each step switched off;
* each network alone (fusion, no post-processing);
* the ensemble with one fold swapped for a candidate's version of it (no post-processing): how much that fold's
  version matters to the average;
* each candidate folder's own ensemble, and every network of every folder averaged.

One JSON line per case goes to ``--jsonl`` (a case already there is skipped, so a killed run resumes); the
summary table is printed from every line in the file(s).

    python3 benchmarks/ensemble_analysis.py --input DIR --jsonl OUT.jsonl [--weights weights]
        [--candidate NAME=DIR ...] [--threads N]
    python3 benchmarks/ensemble_analysis.py --summary OUT.jsonl [MORE.jsonl ...]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from case_rows import add_arguments, read_rows, score_cases, scores  # noqa: E402

from app.conventions import Modality, from_file_labels  # noqa: E402
from app.fusion import TaskProbabilities, fuse  # noqa: E402
from app.inference import EnsemblePredictor  # noqa: E402
from app.io import load_case, load_segmentation  # noqa: E402
from app.options import BiasCorrection, EdemaRelabel  # noqa: E402
from app.pipeline import prepare_image  # noqa: E402
from app.postprocess import PostprocessConfig  # noqa: E402
from app.preprocess import crop_to_brain  # noqa: E402
from app.weights import load_ensemble  # noqa: E402

SHIPPED = "shipped"
STEPS_OFF = {
    "without step 1": PostprocessConfig(remove_small_components=False),
    "without step 2": PostprocessConfig(edema_relabel=EdemaRelabel.OFF),
    "step 2 by the paper's rule": PostprocessConfig(edema_relabel=EdemaRelabel.PAPER),
    "without step 3": PostprocessConfig(min_enhancing_voxels=0, enhancement_check_voxels=0),
    "without step 4": PostprocessConfig(fill_enclosed_core=False),
    "without step 5": PostprocessConfig(drop_doubtful_components=False),
    "without step 6": PostprocessConfig(min_island_voxels=0),
}


def fold_probabilities(predictor: EnsemblePredictor, model: torch.nn.Module, fold: int, image: np.ndarray,
                       region) -> TaskProbabilities:
    """One network's probabilities on a normalised crop, on fold ``fold``'s tile grid (as in the ensemble)."""
    plan = [predictor.plan(image.shape[1:], fold, region)]
    with torch.inference_mode():
        outputs = predictor.runner.run([model], torch.from_numpy(np.ascontiguousarray(image)), plan, [((),)])
    return TaskProbabilities(*(o.numpy() for o in outputs))


def average(parts: list[TaskProbabilities]) -> TaskProbabilities:
    return TaskProbabilities(*(sum(getattr(p, name) for p in parts) / len(parts)
                               for name in ("tumour", "classes", "enhancing")))


def fused(p: TaskProbabilities, brain: np.ndarray) -> np.ndarray:
    return (fuse(p) * brain).astype(np.uint8)


def analyse_case(case, folders: dict[str, list[torch.nn.Module]], predictor: EnsemblePredictor) -> dict:
    loaded = load_case(case)
    truth = from_file_labels(load_segmentation(case, loaded.reference))
    names = [m.value for m in case.modalities]
    image = prepare_image(predictor, loaded.image, BiasCorrection.N4, names).image
    crop = crop_to_brain(image, predictor.crop_margin)
    if crop is None:
        raise ValueError(f"{case.case_id}: empty brain")
    region = predictor.planner.segmented_region(crop.mask)
    t1c = image[names.index(Modality.T1C.value)][crop.box]
    t1 = image[names.index(Modality.T1.value)][crop.box]
    truth = truth[crop.box]
    probabilities = {(name, k): fold_probabilities(predictor, model, k, crop.image, region)
                     for name, models in folders.items() for k, model in enumerate(models)}
    shipped = [probabilities[(SHIPPED, k)] for k in range(len(folders[SHIPPED]))]
    mean = average(shipped)
    ensemble = fused(mean, crop.mask)  # fused once, post-processed every way below
    row: dict = {"case": case.case_id, "ensemble": {}, "single": {}, "swap": {}}
    row["ensemble"]["no post-processing"] = scores(ensemble, truth, t1c)
    row["ensemble"]["default post-processing"] = scores(ensemble, truth, t1c, PostprocessConfig(), mean.tumour, t1)
    for label, config in STEPS_OFF.items():
        row["ensemble"][label] = scores(ensemble, truth, t1c, config, mean.tumour, t1)
    for (name, k), p in probabilities.items():
        row["single"][f"{name}:{k}"] = scores(fused(p, crop.mask), truth, t1c)
        if name != SHIPPED and k < len(shipped):
            swapped = average(shipped[:k] + [p] + shipped[k + 1:])
            row["swap"][f"{name}:{k}"] = scores(fused(swapped, crop.mask), truth, t1c)
    for name, models in folders.items():
        if name != SHIPPED:
            mine = average([probabilities[(name, k)] for k in range(len(models))])
            row["ensemble"][f"{name} ensemble, no post-processing"] = scores(fused(mine, crop.mask), truth, t1c)
    if len(folders) > 1:
        every = average(list(probabilities.values()))
        row["ensemble"]["every network, default post-processing"] = scores(fused(every, crop.mask), truth, t1c,
                                                                          PostprocessConfig(), every.tumour, t1)
    return row


def summary(paths: list[Path]) -> None:
    rows = read_rows(paths)
    if not rows:
        print("no cases")
        return

    def mean(group: str) -> dict[str, np.ndarray]:
        values = defaultdict(list)
        for row in rows:
            for key, value in row[group].items():
                values[key].append(value)
        return {key: np.mean(v, axis=0) for key, v in values.items()}

    print(f"{len(rows)} case(s)\n\n| ensemble of --weights | WT | TC | ET | mean |\n|---|---|---|---|---|")
    for key, v in mean("ensemble").items():
        print(f"| {key} | {v[0]:.4f} | {v[1]:.4f} | {v[2]:.4f} | {v.mean():.4f} |")
    single, swap = mean("single"), mean("swap")
    base = mean("ensemble")["no post-processing"].mean()
    names = sorted({key.split(":")[0] for key in single}, key=lambda n: (n != SHIPPED, n))
    folds = sorted({int(key.split(":")[1]) for key in single})
    print("\nmean Dice of each network alone (no post-processing); in brackets, the ensemble's mean Dice change "
          "when that version replaces the shipped fold")
    print("\n| fold | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for k in folds:
        cells = []
        for name in names:
            key = f"{name}:{k}"
            cell = f"{single[key].mean():.3f}" if key in single else ""
            if key in swap:
                cell += f" ({swap[key].mean() - base:+.4f})"
            cells.append(cell)
        print(f"| {k} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "the ensemble analysed (default: weights/)")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=DIR",
                        help="another weights folder with the same folds, e.g. an earlier fine-tuning round "
                             "(repeatable)")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
        return 0
    if args.input is None or args.jsonl is None:
        parser.error("--input and --jsonl are needed (or --summary FILES)")
    candidates = dict(item.split("=", 1) for item in args.candidate)
    if SHIPPED in candidates or any(not name for name in candidates):
        parser.error(f"candidate names must be non-empty and not {SHIPPED!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    folders = {SHIPPED: load_ensemble(args.weights)[1]}
    folders.update({name: load_ensemble(path)[1] for name, path in candidates.items()})
    predictor = EnsemblePredictor(device="cpu").load_models(folders[SHIPPED])
    score_cases(args.input, args.jsonl, lambda case: analyse_case(case, folders, predictor))
    summary([args.jsonl])
    return 0


if __name__ == "__main__":
    sys.exit(main())
