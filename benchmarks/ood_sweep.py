"""Out-of-distribution sweep: held-out phantoms perturbed one factor at a time at increasing strength.

Each condition takes the same held-out phantoms (generator 2, a series never trained on) and changes one
thing: a bias field stronger than training's, a gamma per modality, noise, blur, thick slices, an intensity
rescale with integer rounding, or the anatomy and contrast drawn outside the generator's training ranges
(thicker cortex; grey matter brighter on FLAIR and T2). Every case goes through the product's own path
(`app.pipeline.segment_image`: ensemble, fusion, default post-processing, confidence) and is scored against
its ground truth. Prints a Markdown table of mean Dice (WT, TC, ET) and mean confidence per factor and
strength, the correlation between confidence and Dice, and how the low-confidence warning splits the cases.

    python3 benchmarks/ood_sweep.py [--weights weights] [--cases 8] [--seed 2000] [--factors all] [--csv out.csv]
        [--bias-correction n4|none] [--skip-cases K]
    python3 benchmarks/ood_sweep.py --from-csv a.csv b.csv    # the table of earlier runs' rows, merged

A sweep grows without redoing its cases: every case-condition is seeded by its case and condition alone, so
`--cases 8 --skip-cases 4` scores cases 5-8 exactly as a full eight-case run would, and `--from-csv` prints the
table over both CSVs.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibrate_confidence import sweep_rows  # noqa: E402

from app.confidence import LOW_CONFIDENCE  # noqa: E402
from app.conventions import MODALITY_ORDER, Modality  # noqa: E402
from app.inference import EnsemblePredictor  # noqa: E402
from app.metrics import region_dice  # noqa: E402
from app.options import BiasCorrection, Mirroring, choices  # noqa: E402
from app.phantoms import DEFAULT_RANGES, make_phantom  # noqa: E402
from app.pipeline import segment_image  # noqa: E402
from app.postprocess import PostprocessConfig  # noqa: E402
from app.weights import load_ensemble  # noqa: E402

STRENGTHS = ("mild", "moderate", "strong")


def _field(rng: np.random.Generator, shape) -> np.ndarray:
    from app.phantoms import _smooth_field

    return _smooth_field(rng, shape, 3)


def _per_channel(image: np.ndarray, brain: np.ndarray, change) -> np.ndarray:
    out = image.copy()
    for c in range(image.shape[0]):
        out[c] = np.where(brain, change(c, image[c]), 0)
    return out


def bias(image, brain, level, rng):
    strength = {"mild": 0.25, "moderate": 0.35, "strong": 0.5}[level]  # log-field std; training: <= 0.2
    return _per_channel(image, brain, lambda c, x: x * np.exp(strength * _field(rng, x.shape)))


def gamma(image, brain, level, rng):
    g = {"mild": 1.3, "moderate": 1.6, "strong": 2.2}[level]

    def change(c, x):
        top = x[brain].max()
        exponent = g if rng.random() < 0.5 else 1 / g
        return (x / top).clip(0, 1) ** exponent * top

    return _per_channel(image, brain, change)


def noise(image, brain, level, rng):
    std = {"mild": 0.08, "moderate": 0.12, "strong": 0.2}[level]  # fraction of the brain mean; training <= 0.06
    return _per_channel(image, brain, lambda c, x: np.abs(x + rng.normal(0, std * x[brain].mean(), x.shape)))


def blur(image, brain, level, rng):
    from scipy import ndimage

    sigma = {"mild": 1.2, "moderate": 1.8, "strong": 2.5}[level]  # training: <= 1.1
    return _per_channel(image, brain, lambda c, x: ndimage.gaussian_filter(x, sigma))


def thick_slices(image, brain, level, rng):
    """Every modality acquired with thick axial slices (average over the slab, linear interpolation back)."""
    import torch
    import torch.nn.functional as F

    factor = {"mild": 4, "moderate": 6, "strong": 8}[level]  # training: <= 5 (generator), <= 6 (strong augment)
    x = torch.from_numpy(image.astype(np.float32))[None]
    low = F.avg_pool3d(x, kernel_size=(factor, 1, 1), stride=(factor, 1, 1), ceil_mode=True)
    back = F.interpolate(low, size=image.shape[1:], mode="trilinear", align_corners=False)[0].numpy()
    return _per_channel(back, brain, lambda c, x: x)


def rescale(image, brain, level, rng):
    """Intensities rescaled and stored as integers (quantisation), as converters do."""
    scale = {"mild": 0.1, "moderate": 0.03, "strong": 0.01}[level]
    return _per_channel(image, brain, lambda c, x: np.maximum(np.round(x * scale), 1))


PERTURBATIONS = {"bias": bias, "gamma": gamma, "noise": noise, "blur": blur, "thick_slices": thick_slices,
                 "rescale": rescale}
# Generator settings outside the training ranges (app.phantoms.PhantomRanges).
_FLAIR_T2_GM = {"mild": ((1.55, 1.7), (1.7, 1.85)), "moderate": ((1.7, 1.85), (1.85, 2.0)),
                "strong": ((1.85, 2.0), (2.0, 2.2))}
ANATOMY = {
    # A thicker cortex, and room for it: the generator holds the cortex's share of the parenchyma within
    # grey_matter_share (training 0.40-0.55), so the bound moves with the thickness.
    "cortex": lambda level: DEFAULT_RANGES.widened(
        cortex_thickness={"mild": (5.5, 6.5), "moderate": (6.5, 7.5), "strong": (7.5, 9.0)}[level],
        grey_matter_share={"mild": (0.40, 0.58), "moderate": (0.40, 0.62), "strong": (0.40, 0.70)}[level]),
    "grey_contrast": lambda level: DEFAULT_RANGES.widened(contrast={
        m: {**t, 2: _FLAIR_T2_GM[level][0 if m is Modality.FLAIR else 1]} if m in (Modality.FLAIR, Modality.T2) else t
        for m, t in DEFAULT_RANGES.contrast.items()}),
}
FACTORS = ("clean", *PERTURBATIONS, *ANATOMY)


def case_arrays(seed: int, index: int, ranges=DEFAULT_RANGES):
    phantom = make_phantom(seed, index, ranges=ranges)
    image = np.stack([phantom.images[m].astype(np.float32) for m in MODALITY_ORDER])
    return image, phantom.labels


def sized_indices(seed: int, cases: int, min_tumour: int) -> list[int]:
    """The first ``cases`` indices of series ``seed`` whose whole tumour has at least ``min_tumour`` voxels:
    the generator also makes tiny tumours (for training), whose Dice swings with a few voxels and would
    drown the effect of each factor."""
    chosen, index = [], 0
    while len(chosen) < cases:
        if (case_arrays(seed, index)[1] > 0).sum() >= min_tumour:
            chosen.append(index)
        index += 1
    return chosen


def run(weights: Path, cases: int, seed: int, factors: list[str], tta: str, min_tumour: int,
        strengths: list[str], bias_correction: BiasCorrection = BiasCorrection.N4, skip_cases: int = 0) -> list[dict]:
    _, models = load_ensemble(weights)
    predictor = EnsemblePredictor(tta=tta).load_models(models)
    rows = []
    indices = sized_indices(seed, cases, min_tumour)[skip_cases:]
    clean = [case_arrays(seed, i) for i in indices]
    for factor in factors:
        for level in (("-",) if factor == "clean" else strengths):
            for i, index in enumerate(indices):
                rng = np.random.default_rng([seed, index, FACTORS.index(factor), len(level)])
                if factor in ANATOMY:
                    image, truth = case_arrays(seed, index, ANATOMY[factor](level))
                else:
                    image, truth = clean[i]
                    if factor != "clean":
                        image = PERTURBATIONS[factor](image, image[0] != 0, level, rng)
                started = time.perf_counter()
                seg = segment_image(predictor, image, PostprocessConfig(), bias_correction=bias_correction)
                dice = region_dice(seg.labels, truth)
                rows.append({"factor": factor, "strength": level, "case": index, **dice,
                             "confidence": seg.confidence, "seconds": round(time.perf_counter() - started, 1)})
                print(f"{factor:>13} {level:>8} case {index}: WT {dice['WT']:.3f} TC {dice['TC']:.3f} "
                      f"ET {dice['ET']:.3f} confidence {seg.confidence}", file=sys.stderr, flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    lines = ["| factor | strength | WT | TC | ET | mean | confidence |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["factor"], r["strength"]), []).append(r)
    for (factor, level), group in groups.items():
        means = {k: np.mean([g[k] for g in group]) for k in ("WT", "TC", "ET", "confidence")}
        lines.append(f"| {factor} | {level} | {means['WT']:.3f} | {means['TC']:.3f} | {means['ET']:.3f} | "
                     f"{np.mean([means['WT'], means['TC'], means['ET']]):.3f} | {means['confidence']:.3f} |")
    dice = np.array([np.mean([r["WT"], r["TC"], r["ET"]]) for r in rows])
    conf = np.array([r["confidence"] for r in rows], float)
    low = conf < LOW_CONFIDENCE
    flagged = dice[low].mean() if low.any() else float("nan")
    kept = dice[~low].mean() if (~low).any() else float("nan")
    lines.append("")
    lines.append(f"Confidence vs mean Dice over {len(rows)} case-conditions: Pearson r = "
                 f"{np.corrcoef(conf, dice)[0, 1]:.2f}; flagged (confidence < {LOW_CONFIDENCE}): {int(low.sum())}, "
                 f"their mean Dice {flagged:.3f}; not flagged: {int((~low).sum())}, mean Dice {kept:.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="weights folder (default: shipped)")
    parser.add_argument("--cases", type=int, default=8, help="held-out phantoms per condition (the README table: 8)")
    parser.add_argument("--seed", type=int, default=2000, help="phantom series of the held-out cases")
    parser.add_argument("--min-tumour", type=int, default=15000,
                        help="use only cases whose whole tumour has at least this many voxels (BraTS-sized)")
    parser.add_argument("--factors", default="all", help=f"comma-separated subset of {','.join(FACTORS)}")
    parser.add_argument("--strengths", default=",".join(STRENGTHS),
                        help="comma-separated subset of mild,moderate,strong")
    parser.add_argument("--tta", default="none", choices=choices(Mirroring), help="test-time mirroring")
    parser.add_argument("--bias-correction", default=BiasCorrection.N4.value, choices=choices(BiasCorrection),
                        help="the predict flag of that name (n4, the default: N4 before normalising)")
    parser.add_argument("--csv", type=Path, default=None, help="also write every case-condition row here")
    parser.add_argument("--skip-cases", type=int, default=0, metavar="K",
                        help="leave out the first K of the --cases chosen cases (to extend an earlier sweep's CSV)")
    parser.add_argument("--from-csv", type=Path, nargs="+", default=None, metavar="CSV",
                        help="run nothing: print the table over these earlier --csv files' rows")
    args = parser.parse_args()
    if args.from_csv:
        print(summarise(sweep_rows(args.from_csv)))
        return 0
    if not 0 <= args.skip_cases < args.cases:
        parser.error(f"--skip-cases must be at least 0 and under --cases ({args.cases}), got {args.skip_cases}")
    factors = list(FACTORS) if args.factors == "all" else args.factors.split(",")
    unknown = set(factors) - set(FACTORS)
    if unknown:
        parser.error(f"unknown factors {sorted(unknown)}; choose from {', '.join(FACTORS)}")
    rows = run(args.weights, args.cases, args.seed, factors, args.tta, args.min_tumour, args.strengths.split(","),
               BiasCorrection(args.bias_correction), args.skip_cases)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    which = f"{args.cases} case(s)" if not args.skip_cases else f"cases {args.skip_cases + 1}-{args.cases}"
    print(f"weights {args.weights}, {which} of series {args.seed} with >= {args.min_tumour} tumour "
          f"voxels, tta {args.tta}, bias correction {args.bias_correction}\n")
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
