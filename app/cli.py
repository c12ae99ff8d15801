"""Command line: ``python3 -m app {predict,infer,phantoms,train,evaluate}``.

Exit status of predict/infer: 0 every case written, 1 some case failed (the others are written),
2 usage error (no case found, unusable weights or output folder, bad flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .case_warnings import cases_per_code
from .conventions import AUTO_LABELS, AUTO_LESION_RULE, LABEL_CHOICES, LESION_RULES, Layout, TruthRecoding
from .options import (
    ENHANCEMENT_CHECK_VOXELS,
    MIN_ENHANCEMENT,
    MIN_ENHANCING_VOXELS,
    MIN_ISLAND_VOXELS,
    MIN_PHANTOM_SIDE,
    POOR_DICE,
    TRAINABLE_VARIANTS,
    AugmentLevel,
    BiasCorrection,
    Device,
    EdemaRelabel,
    EdemaSplit,
    Fusion,
    KeepLargest,
    Mirroring,
    PhantomPreset,
    Precision,
    Resampling,
    Tiling,
    Variant,
    choices,
    parse_scales,
)

if TYPE_CHECKING:  # the real import is deferred: it pulls in scikit-learn, and --help must stay fast
    from .postprocess import PostprocessConfig

EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE = 0, 1, 2
# parameters.yaml keys that are predict flags with a fixed set of values (mlcube/workspace/parameters.yaml),
# and every key the file may hold; the --parameters_file help and the check both read these.
MLCUBE_CHOICE_KEYS = ("device", "tiling", "precision", "tta", "fusion", "bias_correction", "resample",
                      "edema_relabel", "edema_split", "keep_largest", "labels")
MLCUBE_KEYS = ("folds", "scales", *MLCUBE_CHOICE_KEYS, "postprocess")


INF = float("inf")


def int_list(count: int | None = None, *, distinct: bool = False) -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type`` for comma-separated integers: exactly ``count`` of them when given, none repeated
    when ``distinct``. A bad value is then a usage error (exit 2) that names the flag, like any other."""
    what = f"{count} comma-separated integers" if count else "comma-separated integers"

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"needs {what}, got {text!r}") from None
        if not values or (count is not None and len(values) != count):
            raise argparse.ArgumentTypeError(f"needs {what}, got {text!r}")
        if distinct and len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"needs distinct numbers, got {text!r}")
        return values

    return parse


def tile_shape(text: str) -> tuple[int, ...]:
    """An argparse ``type`` for --tile: three positive multiples of 8 (the network pools three times)."""
    values = int_list(3)(text)
    if any(v < 8 or v % 8 for v in values):
        raise argparse.ArgumentTypeError(f"needs three positive multiples of 8, got {text!r}")
    return values


def non_negative_int(text: str) -> int:
    """An argparse ``type`` for a count that may be 0."""
    values = int_list(1)(text)
    if values[0] < 0:
        raise argparse.ArgumentTypeError(f"needs an integer >= 0, got {text!r}")
    return values[0]


def truth_recoding(text: str) -> TruthRecoding:
    """An argparse ``type`` for --truth-recode (`TruthRecoding.parse`)."""
    try:
        return TruthRecoding.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


TRUTH_RECODE_HELP = ("re-code the ground truths' labels as they are read, FROM:TO pairs applied at once (1:3,3:1 "
                     "exchanges two): 4:0 reads BraTS 2024's post-treatment resection cavity as background; a "
                     "release that numbers its regions otherwise is re-coded to 1 NCR/NET, 2 edema, 3 ET by its "
                     "own label table. The files stay as they are (default: read as stored)")


def positive_int(text: str) -> int:
    """An argparse ``type`` for a count of at least 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs an integer >= 1, got {text!r}")
    return value


def phantom_size(text: str) -> tuple[int, ...]:
    """An argparse ``type`` for a phantom's X,Y,Z voxels, each at least MIN_PHANTOM_SIDE."""
    values = int_list(3)(text)
    if min(values) < MIN_PHANTOM_SIDE:
        raise argparse.ArgumentTypeError(f"needs 3 comma-separated integers >= {MIN_PHANTOM_SIDE}, got {text!r}")
    return values


def percentage(text: str) -> int:
    """An argparse ``type`` for a whole percentage, 0 to 100."""
    value = non_negative_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"needs a whole percentage 0-100, got {text!r}")
    return value


def scale_list(text: str) -> tuple[float, ...]:
    """An argparse ``type`` for --scales: distinct comma-separated numbers within SCALE_RANGE."""
    try:
        return parse_scales([float(part) for part in text.split(",") if part.strip()])
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"needs comma-separated numbers: {err} (got {text!r})") from None


def bounded_float(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a number in [low, high] ((low, high] when ``low_open``)."""
    if high == INF:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"needs {what}, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"needs {what}, got {text!r}")
        return value

    return parse


def _add_predict_flags(p: argparse.ArgumentParser, mlcube: bool = False) -> None:
    if mlcube:
        p.add_argument("--data_path", type=Path, required=True, help="folder of input cases (MLCube form)")
        p.add_argument("--output_path", type=Path, required=True, help="folder for the label maps (MLCube form)")
        p.add_argument("--parameters_file", type=Path, default=None,
                       help=f"optional YAML with predict settings: {', '.join(MLCUBE_KEYS)}")
        p.add_argument("--weights", type=Path, default=None, help=argparse.SUPPRESS)
        return
    p.add_argument("--input", type=Path, required=True, help="folder holding one folder (or four files) per case")
    p.add_argument("--output", type=Path, required=True, help="folder that receives <ID>.nii.gz label maps only")
    p.add_argument("--weights", type=Path, default=None,
                   help="weights folder with manifest.json (default: the shipped ensemble in weights/)")
    p.add_argument("--folds", type=int_list(distinct=True), default=None,
                   help="comma-separated fold numbers to ensemble (default: all in the manifest)")
    p.add_argument("--device", default=Device.AUTO.value, choices=choices(Device),
                   help="auto uses CUDA when present, else the CPU (arithmetic: --precision)")
    p.add_argument("--tiling", default=Tiling.FAST.value, choices=choices(Tiling),
                   help="fast: large tiles over the brain's bounding box; paper: 16x32x32 tiles at stride 5x20x20")
    p.add_argument("--tile", type=tile_shape, default=None,
                   help="fast tiling's largest tile D,H,W, multiples of 8 (default 24,48,48; "
                        "160,192,192 covers a brain in one tile)")
    p.add_argument("--tile-margin", type=int, default=None,
                   help="voxels each fast tile discards at its sides where tiles meet (default 2)")
    p.add_argument("--precision", default=Precision.AUTO.value, choices=choices(Precision),
                   help="network arithmetic: auto = bf16 where the device computes it natively (CUDA GPUs with "
                        "bf16, CPUs with AVX512-BF16 or AMX), else fp32; fp32 = IEEE fp32 (no TF32 convolutions)")
    p.add_argument("--tta", default=Mirroring.NONE.value, choices=choices(Mirroring),
                   help="test-time mirroring: none; folds = fold k sees the k-th of the 8 mirror images (no extra "
                        "cost); full = every fold sees all 8 (nnU-Net's, 8x the network time)")
    p.add_argument("--scales", type=scale_list, default=(1.0,),
                   help="test-time scaling: comma-separated factors in [0.5, 2]; the ensemble runs once on the "
                        "brain crop resampled by each (1 = as it is), and the passes' probabilities, resampled "
                        "back, are averaged (1,1.25: about 3x the network time; default 1 = one pass)")
    p.add_argument("--fusion", default=Fusion.REGIONS.value, choices=choices(Fusion),
                   help="how task 2's class probabilities label a voxel: regions (default) = tumour where "
                        "NCR/NET + edema + ET is more likely than not, core where NCR/NET + ET is more likely than "
                        "edema (BraTS's nested regions); paper = their argmax (the authors')")
    p.add_argument("--bias-correction", default=BiasCorrection.N4.value, choices=choices(BiasCorrection),
                   help="n4 (default): correct each modality's intensity non-uniformity before normalising "
                        "(SimpleITK N4, fitted inside the brain outside the tumour that two folds find first; "
                        "about 4 s of CPU plus a fifth of the ensemble's network time per case); none: the "
                        "images as they are (the paper's path)")
    p.add_argument("--resample", default=Resampling.AUTO.value, choices=choices(Resampling),
                   help="auto (default): a case whose voxels are coarser than 1 mm along some axis (thick slices; "
                        "by more than 5%%) is segmented on a grid of about 1 mm along it (BraTS's, which the network "
                        "learnt), finer axes as they are, and its labels resampled back onto its own grid; all: "
                        "finer axes too (by more than 5%%) to about 1 mm (nnU-Net's way); off: every case on its "
                        "own voxels")
    p.add_argument("--labels", default=AUTO_LABELS, choices=LABEL_CHOICES,
                   help="label encoding: auto follows the case layout (2023 files -> ET=3, others -> ET=4)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="skip all post-processing (the paper's two steps, --min-et-voxels and its enhancement check, "
                        "the core filling, the doubtful-component removal and the island removal)")
    p.add_argument("--no-small-component-removal", action="store_true", help="skip post-processing step 1")
    p.add_argument("--edema-relabel", default=EdemaRelabel.NON_ENHANCING.value, choices=choices(EdemaRelabel),
                   help="when post-processing step 2 (K-means: edema dark on T1c -> NCR/NET) runs: non-enhancing "
                        "(default) = in a case with little ET whose largest ET component is also under "
                        "--min-et-voxels or fails step 3's enhancement check; paper = in every case with little ET "
                        "(the authors'); off")
    p.add_argument("--no-edema-relabel", action="store_true", help="skip post-processing step 2 (--edema-relabel off)")
    p.add_argument("--edema-split", default=EdemaSplit.K_MEANS.value, choices=choices(EdemaSplit),
                   help="which of a component's edema step 2 relabels NCR/NET: k-means (default) = the darker of "
                        "two K-means clusters of its T1c (the authors'); dark-tail = only the edema more than "
                        "2 robust standard deviations below its median T1c (ours)")
    p.add_argument("--min-et-voxels", type=non_negative_int, default=MIN_ENHANCING_VOXELS,
                   help="post-processing step 3 (ours, not the paper's): a case whose largest ET component has "
                        f"fewer voxels than this has all its ET relabelled NCR/NET (default {MIN_ENHANCING_VOXELS}); "
                        "0 switches it off, with its enhancement check")
    p.add_argument("--et-check-voxels", type=non_negative_int, default=ENHANCEMENT_CHECK_VOXELS,
                   help="step 3's enhancement check (ours): when the largest ET component has fewer voxels than "
                        f"this (default {ENHANCEMENT_CHECK_VOXELS}), the ET must also be brighter on T1c than on T1, "
                        "against the tissue around it, by --min-et-enhancement brain standard deviations, or all "
                        "its ET becomes NCR/NET and step 2 treats the tumour as non-enhancing; 0 switches it off")
    p.add_argument("--min-et-enhancement", type=float, default=MIN_ENHANCEMENT,
                   help="the enhancement (median z(T1c) - z(T1) in the ET minus that within 2 voxels around it) "
                        f"that --et-check-voxels asks of a small ET (default {MIN_ENHANCEMENT})")
    p.add_argument("--no-core-filling", action="store_true",
                   help="skip post-processing step 4 (ours, not the paper's): by default non-tumour voxels that the "
                        "tumour encloses in an axial, coronal or sagittal slice, in a hole touching the predicted "
                        "core, and then whatever the core encloses in such a slice, become NCR/NET")
    p.add_argument("--keep-doubtful-components", action="store_true",
                   help="skip post-processing step 5 (ours, not the paper's): by default a tumour component whose "
                        "mean fold-averaged task-1 tumour probability is under 0.5 is removed, but for one when "
                        "no component reaches 0.5 and holds core (--keep-largest)")
    p.add_argument("--min-island-voxels", type=non_negative_int, default=MIN_ISLAND_VOXELS,
                   help="post-processing step 6 (ours, not the paper's): an ET component of fewer voxels than this "
                        "(not the largest) becomes NCR/NET, then a core component of fewer (not the largest) "
                        f"becomes edema: specks that BraTS's lesion-wise scores count as false lesions (default "
                        f"{MIN_ISLAND_VOXELS}); 0 switches it off")
    p.add_argument("--keep-largest", default=KeepLargest.MOST_CORE.value, choices=choices(KeepLargest),
                   help="which tumour component step 5 spares however doubtful: most-core (default) = only when no "
                        "component with core reaches 0.5, and then the one holding the most core (the largest "
                        "where none holds core), so a large doubtful component beside a smaller sure tumour goes; "
                        "when-none-sure = as most-core, but the largest (rounds 46-51); always = the largest, "
                        "whatever the others (the rule before round 46)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip cases whose complete label map is already in the output folder")
    p.add_argument("--save-probabilities", type=Path, default=None,
                   help="also write fold-averaged task probabilities (7-component NIfTI) to this folder")
    p.add_argument("--shard", default="0/1", help="I/N: process every N-th case starting at the I-th (0-based)")
    p.add_argument("--report", type=Path, default=None, help="write the per-case summary as JSON to this file")
    p.add_argument("--qc", type=Path, default=None, help="write one QC picture (PNG) per case to this folder")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="CPU threads for torch (default 0: the CPU quota)")
    p.add_argument("--prepare-ahead", type=non_negative_int, default=0,
                   help="cases read and bias-corrected (the tumour scout, then N4 on the CPU) by this many worker "
                        "threads while the device runs the ensemble on an earlier case; 0 (default): each case "
                        "is corrected just before its ensemble pass. For a GPU, where N4 is most of a case's "
                        "time; on a CPU the two share the cores (on 2 cores, 1 neither gained nor cost, 2 cost "
                        "8%%). Each case held ahead costs about 0.3 GB at BraTS's size")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, nor the 'started' line printed per case when stderr is not a terminal "
                        "(summary lines still printed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m app",
                                     description="OM-Net + CGA brain tumour segmentation (BraTS).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict_flags(sub.add_parser("predict", help="segment every case under --input into --output"))
    infer = sub.add_parser("infer", help="MLCube form of predict, as BraTS orchestrators call it")
    _add_predict_flags(infer, mlcube=True)
    _add_phantoms_flags(sub.add_parser("phantoms", help="generate BraTS-like phantom cases with ground truth"))
    _add_train_flags(sub.add_parser("train", help="train a k-fold ensemble into a weights folder",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    _add_evaluate_flags(sub.add_parser("evaluate", help="BraTS metrics of predictions against ground truth"))
    _add_average_flags(sub.add_parser("average", help="interpolate two weights folders fold by fold (WiSE-FT)"))
    _add_combine_flags(sub.add_parser("combine", help="replace or add folds of a weights folder from another"))
    return parser


def _add_combine_flags(co: argparse.ArgumentParser) -> None:
    co.add_argument("--base", type=Path, required=True, help="weights folder whose folds are kept unless replaced")
    co.add_argument("--replacement", type=Path, required=True,
                    help="weights folder whose folds replace the same folds of --base, or are added where --base "
                         "lacks them (same variant; the width may differ, e.g. wider folds trained on a GPU a "
                         "few at a time)")
    co.add_argument("--out", type=Path, required=True, help="new weights folder (manifest records both inputs)")


def _add_average_flags(av: argparse.ArgumentParser) -> None:
    av.add_argument("--base", type=Path, required=True, help="weights folder before fine-tuning")
    av.add_argument("--tuned", type=Path, required=True,
                    help="weights folder fine-tuned from --base (same variant, width and folds)")
    av.add_argument("--alpha", type=float, default=0.5,
                    help="share of --tuned: each tensor becomes (1 - alpha) * base + alpha * tuned")
    av.add_argument("--out", type=Path, required=True, help="new weights folder (manifest records both inputs)")


BRIGHT_CORTEX_HELP = ("whole percentage (0-100, default 0: the presets as they are) of cases whose grey matter is "
                      "drawn as bright as edema on FLAIR (0.85-1.05x edema; deep grey matter between it and white "
                      "matter), which other generators and scanners produce and ours otherwise almost never; case "
                      "IDs carry it (C<percent>)")
BRIGHT_CORE_HELP = ("whole percentage (0-100, default 0: the presets as they are, 15%% of cases without ET) of cases "
                    "drawn without ET, each with a tumour core as bright as or brighter than its edema on FLAIR "
                    "(0.95-1.4x) and brighter on T2 (1.0-1.4x), a non-enhancing tumour's solid part, which other "
                    "generators and scanners produce and ours otherwise seldom; case IDs carry it (K<percent>)")


def _add_phantoms_flags(ph: argparse.ArgumentParser) -> None:
    ph.add_argument("--out", type=Path, required=True, help="folder to write the cases into")
    ph.add_argument("--n", type=positive_int, required=True, help="number of cases")
    ph.add_argument("--seed", type=non_negative_int, default=0,
                    help="series seed; case i is deterministic for (seed, i)")
    ph.add_argument("--start", type=non_negative_int, default=0, help="index of the first case in the series")
    ph.add_argument("--convention", default=Layout.BRATS2023.value, choices=choices(Layout), help="file naming layout")
    ph.add_argument("--size", type=phantom_size, default="240,240,155",
                    help="X,Y,Z voxels (1 mm); anatomy scales with it")
    ph.add_argument("--ranges", default=PhantomPreset.TRAINING.value, choices=choices(PhantomPreset),
                    help="training: the generator's ranges, which the shipped weights were trained on; wide: "
                         "anatomy and appearance stretched beyond them (thicker cortex, brighter grey matter, "
                         "stronger bias, more noise, blur and thick slices), an out-of-distribution set; mixed: "
                         "the two alternating (even case indices training, odd wide)")
    ph.add_argument("--bright-cortex", type=percentage, default=0, metavar="PERCENT",
                    help=BRIGHT_CORTEX_HELP)
    ph.add_argument("--bright-core", type=percentage, default=0, metavar="PERCENT", help=BRIGHT_CORE_HELP)


def _add_train_flags(tr: argparse.ArgumentParser) -> None:
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="training folder (BraTS layout, with *seg files)")
    source.add_argument("--phantoms", type=positive_int, metavar="N",
                        help="train on N generated phantoms made in memory (no NIfTI files), series --phantom-seed")
    tr.add_argument("--phantom-seed", type=non_negative_int, default=1, help="series seed of --phantoms")
    tr.add_argument("--phantom-ranges", default=PhantomPreset.TRAINING.value, choices=choices(PhantomPreset),
                    help="ranges --phantoms are drawn from (the phantoms command's --ranges): training, wide "
                         "(anatomy and appearance stretched beyond them) or mixed (the two alternating case by case)")
    tr.add_argument("--phantom-size", type=phantom_size, default="240,240,155",
                    help="X,Y,Z voxels of --phantoms")
    tr.add_argument("--phantom-bright-cortex", type=percentage, default=0, metavar="PERCENT",
                    help=f"the phantoms command's --bright-cortex for --phantoms: {BRIGHT_CORTEX_HELP}")
    tr.add_argument("--phantom-bright-core", type=percentage, default=0, metavar="PERCENT",
                    help=f"the phantoms command's --bright-core for --phantoms: {BRIGHT_CORE_HELP}")
    tr.add_argument("--out", type=Path, required=True, help="weights folder to (re)write; resumes if it has runs/")
    tr.add_argument("--variant", default=Variant.OMNET_CGA.value, choices=TRAINABLE_VARIANTS,
                    help="network (cascade = the three-model MC3 baseline)")
    tr.add_argument("--width", type=positive_int, default=32, help="base channel count w (the paper uses 32)")
    tr.add_argument("--folds", type=int, default=10, help="number of folds in the ensemble")
    tr.add_argument("--fold", type=int_list(distinct=True), default=None,
                    help="train only these folds, comma-separated (for separate cluster jobs)")
    tr.add_argument("--stage-steps", type=int_list(3), default="1000,1000,18000",
                    help="curriculum steps: task 1 alone, +task 2, +task 3 (comma-separated)")
    tr.add_argument("--no-curriculum", action="store_true", help="all tasks from the first step (OM-Net0)")
    tr.add_argument("--no-transfer", action="store_true", help="disable online data transfer (OM-Net0)")
    tr.add_argument("--batch", type=positive_int, default=20, help="patches per task per step")
    tr.add_argument("--lr", type=bounded_float(0.0, INF), default=1e-3, help="base learning rate (SGD)")
    tr.add_argument("--momentum", type=bounded_float(0.0, 1.0), default=0.99, help="SGD momentum")
    tr.add_argument("--weight-decay", type=bounded_float(0.0, INF), default=5e-4,
                    help="weight decay on weights (not biases)")
    tr.add_argument("--lr-halve-every", type=positive_int, default=4000, help="halve the learning rate every N steps")
    tr.add_argument("--validate-every", type=positive_int, default=500,
                    help="validate on the held-out fold every N steps")
    tr.add_argument("--val-cases", type=non_negative_int, default=0,
                    help="held-out cases used for validation (0 = all)")
    tr.add_argument("--seed", type=non_negative_int, default=0, help="seed of the fold split and of sampling")
    tr.add_argument("--device", default=Device.AUTO.value, choices=choices(Device), help="training device")
    tr.add_argument("--precision", default=Precision.AUTO.value, choices=choices(Precision),
                    help="training arithmetic: bf16 autocast (loss and weights stay fp32) or IEEE fp32 (cuDNN's "
                         "TF32 off); auto = bf16 on a GPU that computes it natively, else fp32; bf16 is refused "
                         "on a CPU (NaN gradients)")
    tr.add_argument("--threads", type=non_negative_int, default=0,
                    help="CPU threads for torch (default 0: the CPU quota)")
    tr.add_argument("--cache", type=Path, default=None,
                    help="folder for prepared training arrays (.npy, memory-mapped; shared by concurrent fold jobs)")
    tr.add_argument("--augment", default=AugmentLevel.DEFAULT.value, choices=choices(AugmentLevel),
                    help="training augmentation (app/augment.py): flips, rotation/scaling, gamma, contrast, bias "
                         "field, noise, blur, thick slices; none switches it off")
    tr.add_argument("--augment-acquisition", type=bounded_float(0.0, 1.0), default=0.0,
                    help="probability per patch that blur and thick slices hit all four modalities alike, as when "
                         "a whole examination is acquired at low resolution (0: the per-modality draws only)")
    tr.add_argument("--augment-tumour-contrast", type=bounded_float(0.0, 1.0), default=0.0,
                    help="probability per patch and modality that NCR, edema and ET each get their own contrast "
                         "factor (0.85-1.2, smoothed over 3 voxels), so that no one tumour-to-brain intensity "
                         "ratio is learnt (0: off)")
    tr.add_argument("--rare-case-weight", type=bounded_float(0.0, 100.0, low_open=True), default=1.0,
                    help="draw cases of a rare tumour kind (no enhancing rim, solidly enhancing, or a small core) "
                         "this many times as often as others (1: uniform, as the paper)")
    tr.add_argument("--task1-tumour-fraction", type=bounded_float(0.0, 1.0), default=0.0,
                    help="fraction of task-1 patches centred near the tumour rather than anywhere in the brain "
                         "(0: the paper's uniform draw)")
    tr.add_argument("--hard-case-power", type=bounded_float(0.0, 4.0), default=0.0,
                    help="draw each case by its running task-1 patch loss over the cases' mean, to this power "
                         "(the weight clipped to 0.25-4x; combines with --rare-case-weight), so that the cases the "
                         "network reads worst come back more often; reading the losses syncs a GPU every step "
                         "(0: off)")
    tr.add_argument("--average-from", type=int, default=-1, metavar="STEP",
                    help="from this training step on, keep a uniform running average of the weights after every "
                         "step (stochastic weight averaging), validate it beside the model, and publish it instead "
                         "of the best-validating snapshot; on resume the average continues (-1: off)")
    tr.add_argument("--patch-size", type=int_list(3), default="16,32,32", metavar="D,H,W",
                    help="training patch, multiples of 8 (the paper's 16,32,32); 24,48,48 trains on the context "
                         "the fast tiling's tiles give the network at inference (batch counts patches, so a larger "
                         "patch makes each step dearer)")
    tr.add_argument("--compile", action="store_true",
                    help="run the training step's network through torch.compile (fused kernels for the same "
                         "network; its dropout then draws Inductor's own random numbers); costs tens of seconds of "
                         "compiling per process and needs a C++ compiler on a CPU, Triton "
                         "on a GPU, checked before any case is prepared; not for the cascade (docs/SPEED.md)")
    tr.add_argument("--bias-correction", default=BiasCorrection.NONE.value, choices=choices(BiasCorrection),
                    help="none (default: the shipped folds trained so): the cases as they are; n4: N4-correct every "
                         "training case as it is prepared, as predict's default corrects a case before the "
                         "ensemble sees it (fitted outside the true tumour grown as predict's scout is), so the "
                         "networks learn what they will be shown; cached apart from uncorrected arrays; adds N4's "
                         "seconds per case to preparing (EXPERIMENTS round 66); recorded in the manifest")
    tr.add_argument("--prepare-workers", type=non_negative_int, default=0,
                    help="with --cache: prepare (and generate) every case in this many processes before training")
    tr.add_argument("--prepare-only", action="store_true",
                    help="with --cache and --prepare-workers: prepare the cases, then stop (before parallel fold jobs)")
    tr.add_argument("--time-limit", type=bounded_float(0.0, INF, low_open=True), default=None,
                    help="seconds per fold after which training stops at the next step (validated and saved)")
    tr.add_argument("--init-from", type=Path, default=None,
                    help="start from these model weights (same variant and width), e.g. to fine-tune: a safetensors "
                         "file, or a weights folder whose fold K each trained fold K starts from")
    tr.add_argument("--manifest-only", action="store_true",
                    help="only rewrite manifest.json from the folds already finished in --out "
                         "(after separate fold jobs)")
    tr.add_argument("--data-note", default=None, help="free text recorded in the manifest about the data")
    tr.add_argument("--truth-recode", type=truth_recoding, default=None,
                    help=f"with --data: {TRUTH_RECODE_HELP}; recorded in the manifest")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_evaluate_flags(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--pred", type=Path, required=True, help="folder of <ID>.nii.gz predictions")
    ev.add_argument("--gt", type=Path, required=True,
                    help="folder of ground truths (<ID>-seg.nii.gz or <ID>_seg.nii.gz, in case folders or flat, "
                         "with or without the images; any BraTS layout)")
    ev.add_argument("--csv", type=Path, default=None, help="write per-case and mean metrics to this CSV")
    ev.add_argument("--labels", default=AUTO_LABELS, choices=LABEL_CHOICES, help="label encoding of the files")
    ev.add_argument("--qc", type=Path, default=None,
                    help="write one QC picture per case (prediction vs truth; needs the images beside the truth)")
    ev.add_argument("--lesion-rule", default=AUTO_LESION_RULE, choices=[AUTO_LESION_RULE, *LESION_RULES],
                    help="settings of the lesion-wise scores (BraTS 2023's, per challenge: GLI, SSA and PED merge "
                         "lesions within 3 voxels and leave out those of at most 50 mm3, MEN within 1 and 50 mm3, "
                         "MET within 1 and 2 mm3); auto (default) = the challenge a case's ID names "
                         "(BraTS-MEN-...), GLI for other IDs")
    ev.add_argument("--truth-recode", type=truth_recoding, default=None, help=TRUTH_RECODE_HELP)
    ev.add_argument("--predict-report", type=Path, default=None,
                    help="the JSON that predict --report wrote for these predictions: each case's confidence joins "
                         "its row (CSV columns confidence and warned), and a line says how many poor cases the "
                         "low-confidence warning caught and how many others it flagged")
    ev.add_argument("--poor", type=float, default=POOR_DICE,
                    help="with --predict-report: mean Dice over WT, TC and ET under which a case is poor "
                         "(default: %(default)s)")


def cpu_quota() -> int:
    """CPUs this process may use: the cgroup quota (containers) and the affinity mask, whichever is less."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def _set_threads(requested: int) -> None:
    import torch

    torch.set_num_threads(requested if requested > 0 else cpu_quota())


def _mlcube_to_predict(args: argparse.Namespace) -> argparse.Namespace:
    """Map the MLCube form onto predict's flags, reading the optional parameters file."""
    settings: dict = {}
    if args.parameters_file is not None:
        import yaml

        try:
            settings = yaml.safe_load(args.parameters_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read --parameters_file {args.parameters_file}: {err}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"--parameters_file {args.parameters_file} must hold a mapping")
    allowed = set(MLCUBE_KEYS)
    unknown = set(settings) - allowed
    if unknown:
        raise ValueError(f"--parameters_file: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    argv = ["predict", "--input", str(args.data_path), "--output", str(args.output_path), "--quiet"]
    if args.weights is not None:
        argv += ["--weights", str(args.weights)]
    for key in ("folds", "scales"):  # a YAML list or a comma-separated string
        value = settings.get(key)
        if value is not None:
            argv += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    for key in MLCUBE_CHOICE_KEYS:  # their values are checked by predict's parser (its choices)
        if key in settings:
            argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    if not settings.get("postprocess", True):
        argv.append("--no-postprocess")
    # The predict parser supplies every other default, so the two forms cannot drift apart.
    return build_parser().parse_args(argv)


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    # Unwind through the finally blocks so temporary files are removed; exit 143 like a killed process.
    raise SystemExit(128 + signum)


def postprocess_config(args: argparse.Namespace) -> PostprocessConfig:
    """The post-processing predict's flags ask for (``--no-postprocess`` overrides every step's own flag)."""
    from .postprocess import PostprocessConfig

    off = args.no_postprocess
    return PostprocessConfig(
        remove_small_components=not (off or args.no_small_component_removal),
        edema_relabel=EdemaRelabel.OFF if off or args.no_edema_relabel else EdemaRelabel(args.edema_relabel),
        edema_split=EdemaSplit(args.edema_split),
        min_enhancing_voxels=0 if off else args.min_et_voxels,
        enhancement_check_voxels=0 if off else args.et_check_voxels,
        min_enhancement=args.min_et_enhancement,
        fill_enclosed_core=not (off or args.no_core_filling),
        drop_doubtful_components=not (off or args.keep_doubtful_components),
        keep_largest=KeepLargest(args.keep_largest),
        min_island_voxels=0 if off else args.min_island_voxels,
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import EnsemblePredictor
    from .pipeline import CaseStatus, PredictOptions, UsageError, parse_shard, run_predict
    from .weights import DEFAULT_WEIGHTS_DIR, WeightsError, load_ensemble

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        shard = parse_shard(args.shard)
        _set_threads(args.threads)
        # Weights are checked (manifest, sha256, shapes) before any case is read.
        _, models = load_ensemble(args.weights or DEFAULT_WEIGHTS_DIR, list(args.folds) if args.folds else None)
        tiles = {}
        if args.tile is not None:
            tiles["max_tile"] = args.tile
        if args.tile_margin is not None:
            tiles["margin"] = args.tile_margin
        predictor = EnsemblePredictor(device=args.device, tiling=args.tiling, precision=args.precision,
                                      tta=args.tta, fusion=args.fusion, scales=args.scales,
                                      **tiles).load_models(models)
        options = PredictOptions(
            input_dir=args.input, output_dir=args.output, labels=args.labels,
            postprocess=postprocess_config(args),
            bias_correction=BiasCorrection(args.bias_correction), resampling=Resampling(args.resample),
            skip_existing=args.skip_existing,
            save_probabilities=args.save_probabilities, shard=shard,
            report=args.report, qc_dir=args.qc, progress=not args.quiet and sys.stderr.isatty(),
            announce=not args.quiet and not sys.stderr.isatty(), prepare_ahead=args.prepare_ahead,
        )
        results = run_predict(predictor, options)
    except (UsageError, WeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    failed = [r for r in results if r.status is CaseStatus.FAILED]
    done = len(results) - len(failed)
    print(f"{done} of {len(results)} case(s) written to {args.output}", file=sys.stderr)
    warned = cases_per_code([r.warnings for r in results])
    if warned:
        print("cases with warnings: " + ", ".join(f"{code} {n}" for code, n in warned.items()), file=sys.stderr)
    if failed:
        print(f"{len(failed)} case(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.error}", file=sys.stderr)
        return EXIT_CASE_FAILED
    return EXIT_OK


def cmd_phantoms(args: argparse.Namespace) -> int:
    from .conventions import Layout
    from .phantoms import PhantomMix, generate

    mix = PhantomMix(PhantomPreset(args.ranges), args.bright_cortex, args.bright_core)
    try:
        folders = generate(args.out, args.n, args.seed, Layout(args.convention), args.size, args.start, mix)  # type: ignore[arg-type]
    except OSError as err:  # --out cannot hold the cases: a file there, no permission, a full disk
        print(f"error: cannot write the phantoms to {args.out}: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {len(folders)} phantom case(s) to {args.out}", file=sys.stderr)
    return EXIT_OK


def _out_is_a_file(out: Path) -> bool:
    """Whether ``--out`` names an existing file (said on stderr): the weights folder could not be made there.
    Checked before anything runs; the folder itself is made only once the request is known to be good."""
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file, not a folder", file=sys.stderr)
        return True
    return False


def _training_stopped(err: Exception) -> int:
    """Say why training cannot run and return its exit status: 1 for a training case that cannot be read (mend
    or remove it, then resume), 2 for a request that cannot be met (--data, --init-from, --fold, --precision,
    --device)."""
    from .io import CaseError

    print(f"error: {err}", file=sys.stderr)
    return EXIT_CASE_FAILED if isinstance(err, CaseError) else EXIT_USAGE


def cmd_train(args: argparse.Namespace) -> int:
    from .io import CaseError
    from .phantoms import GENERATOR_VERSION, PhantomMix
    from .train import (
        TrainConfig,
        TrainingSetupError,
        phantom_cases,
        prepare_all,
        train_ensemble,
        training_handles,
        write_ensemble_manifest,
    )
    from .weights import WeightsError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if _out_is_a_file(args.out):
        return EXIT_USAGE
    _set_threads(args.threads)
    cfg = TrainConfig(
        variant=args.variant, width=args.width, folds=args.folds, stage_steps=args.stage_steps,  # type: ignore[arg-type]
        curriculum=not args.no_curriculum, transfer=not args.no_transfer, batch=args.batch, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, lr_halve_every=args.lr_halve_every,
        validate_every=args.validate_every, val_cases=args.val_cases, seed=args.seed, device=args.device,
        init_from=str(args.init_from) if args.init_from else None, augment=args.augment, precision=args.precision,
        augment_acquisition=args.augment_acquisition,
        augment_tumour_contrast=args.augment_tumour_contrast,
        rare_case_weight=args.rare_case_weight, task1_tumour_fraction=args.task1_tumour_fraction,
        hard_case_power=args.hard_case_power, average_from=args.average_from,
        patch_size=args.patch_size,  # type: ignore[arg-type]
        compile=args.compile, bias_correction=args.bias_correction,
    )
    if args.phantoms is not None and args.truth_recode is not None:
        print("error: --truth-recode re-codes the ground truths of --data; phantoms carry the model's own labels",
              file=sys.stderr)
        return EXIT_USAGE
    if args.phantoms is not None:
        mix = PhantomMix(PhantomPreset(args.phantom_ranges), args.phantom_bright_cortex, args.phantom_bright_core)
        cases = phantom_cases(args.phantoms, args.phantom_seed, args.phantom_size, mix)
        data = {"phantoms": {"n": args.phantoms, "seed": args.phantom_seed, "size": list(args.phantom_size),
                             "ranges": mix.preset.value, "bright_cortex_percent": mix.bright_cortex,
                             "bright_core_percent": mix.bright_core,
                             "generator_version": GENERATOR_VERSION},
                "note": args.data_note}
    else:
        cases = args.data
        data = {"path": str(args.data), "note": args.data_note,
                "truth_recode": None if args.truth_recode is None else str(args.truth_recode)}
    if args.prepare_only:
        if args.cache is None:
            print("error: --prepare-only needs --cache", file=sys.stderr)
            return EXIT_USAGE
        try:
            handles = training_handles(cases, args.truth_recode, cfg.bias_correction)
            prepare_all(handles, args.cache, max(1, args.prepare_workers))
        except (TrainingSetupError, CaseError) as err:
            return _training_stopped(err)
        print(f"prepared {len(handles)} case(s) in {args.cache}", file=sys.stderr)
        return EXIT_OK
    if args.manifest_only:
        manifest = write_ensemble_manifest(args.out, cfg, data)
        print(f"weights folder {args.out}: {len(manifest['folds'])} fold(s)", file=sys.stderr)
        return EXIT_OK
    try:
        manifest = train_ensemble(cfg, cases, args.out, args.fold, data, progress=not args.quiet,
                                  cache_dir=args.cache, time_limit=args.time_limit,
                                  prepare_workers=args.prepare_workers, recoding=args.truth_recode)
    except (WeightsError, TrainingSetupError, CaseError) as err:
        return _training_stopped(err)
    print(f"weights folder {args.out}: {len(manifest['folds'])} fold(s)", file=sys.stderr)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_folder

    return evaluate_folder(args.pred, args.gt, args.csv, args.labels, args.qc, args.lesion_rule,
                           args.predict_report, args.poor, args.truth_recode)


def cmd_average(args: argparse.Namespace) -> int:
    from .weights import WeightsError, average_ensembles

    if _out_is_a_file(args.out):
        return EXIT_USAGE
    try:
        manifest = average_ensembles(args.base, args.tuned, args.out, args.alpha)
    except (WeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"weights folder {args.out}: {len(manifest['folds'])} fold(s), alpha {args.alpha}", file=sys.stderr)
    return EXIT_OK


def cmd_combine(args: argparse.Namespace) -> int:
    from .weights import WeightsError, combine_ensembles

    if _out_is_a_file(args.out):
        return EXIT_USAGE
    try:
        manifest = combine_ensembles(args.base, args.replacement, args.out)
    except (WeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    widths = sorted({f["width"] for f in manifest["folds"]})
    print(f"weights folder {args.out}: {len(manifest['folds'])} fold(s), {len(manifest['combined']['replaced_folds'])} "
          f"from --replacement, width(s) {widths}", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "infer":
        try:
            args = _mlcube_to_predict(args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        return cmd_predict(args)
    handlers = {"predict": cmd_predict, "phantoms": cmd_phantoms, "train": cmd_train, "evaluate": cmd_evaluate,
                "average": cmd_average, "combine": cmd_combine}
    return handlers[args.command](args)
