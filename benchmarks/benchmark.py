"""Per-stage timing of the predict path on one 240x240x155 phantom case; prints a Markdown table.

Each configuration runs in its own subprocess so peak RAM (ru_maxrss) and GPU memory belong to it alone.
Configurations: paper vs fast tiling with the same weights, one fold vs the whole ensemble, the shipped
width and width 32 (random weights of the same architecture: speed does not depend on the values), and the
network's arithmetic (an optional fourth part: auto, fp32 or bf16).

    python3 benchmarks/benchmark.py [--device cpu|cuda] [--configs shipped-fast-all,shipped-paper-1-fp32,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = "shipped-fast-1,shipped-fast-all,shipped-paper-1,w32-fast-1"


SHIPPED = Path(os.environ.get("OMNET_BENCH_WEIGHTS", ROOT / "weights"))


def weights_for(spec: str, folds: int, workdir: Path) -> Path:
    """The shipped weights, or random weights of width N written to ``workdir`` (spec ``wN``)."""
    from app.weights import read_manifest

    if spec == "shipped":
        return SHIPPED
    import torch

    from app.model import build_model
    from app.weights import save_state, write_manifest

    width = int(spec[1:])
    variant = read_manifest(SHIPPED).variant if (SHIPPED / "manifest.json").exists() else "omnet_cga"
    folder = workdir / f"random_w{width}"
    if not (folder / "manifest.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for fold in range(folds):
            torch.manual_seed(fold)
            save_state(build_model(variant, width).state_dict(), folder / f"fold_{fold}.safetensors")
            entries.append({"fold": fold, "file": f"fold_{fold}.safetensors"})
        write_manifest(folder, variant, width, entries, {"note": "random weights for benchmarking only"})
    return folder


def predictor_options(tiling: str) -> dict:
    """EnsemblePredictor knobs for a TILING token: fast (the default), whole (whole-brain tiles), paper,
    tDxHxWmM (fast tiling with tiles up to DxHxW and margin M, e.g. t16x48x48m2), or papershiftN (the paper
    tiling with its grid moved N voxels along every axis: how much the paper tiling disagrees with itself).
    A fast token ending in ``fixed`` (fastfixed, t24x48x48m2fixed) gives every fold the same tile grid. Each
    ``@S`` after a token adds test-time scale S to scale 1 (fast@1.25 = predict's --scales 1,1.25)."""
    from app.options import parse_scales

    tiling, *extra = tiling.split("@")
    fixed = tiling.endswith("fixed")
    options = _token_options(tiling.removesuffix("fixed") if fixed else tiling)
    if fixed:
        if options["tiling"] != "fast":
            raise ValueError(f"tiling must be a fast token to take 'fixed', got {tiling!r}")
        options["shift_folds"] = False
    if extra:
        try:
            options["scales"] = parse_scales([1.0, *(float(s) for s in extra)])
        except ValueError as err:
            raise ValueError(f"bad @scale in tiling token: {err}") from None
    return options


def _token_options(tiling: str) -> dict:
    from app.preprocess import CROP_MARGIN

    if tiling in ("fast", "paper"):
        return {"tiling": tiling}
    if tiling == "whole":  # an alias: one tile covers a 240x240x155 case's brain box
        tiling = "t160x192x192m8"
    shift = re.fullmatch(r"papershift(\d+)", tiling)
    if shift is not None:
        return {"tiling": "paper", "crop_margin": CROP_MARGIN + int(shift.group(1))}
    match = re.fullmatch(r"t(\d+)x(\d+)x(\d+)m(\d+)", tiling)
    if match is None:
        raise ValueError(f"tiling must be fast, whole, paper, papershiftN or tDxHxWmM (optionally + fixed), "
                         f"got {tiling!r}")
    *tile, margin = (int(g) for g in match.groups())
    return {"tiling": "fast", "max_tile": tuple(tile), "margin": margin}


def parse_config(config: str) -> tuple[str, str, str, str]:
    """WEIGHTS-TILING-FOLDS[-PRECISION] -> its four parts (precision defaults to auto, as in predict)."""
    parts = config.split("-")
    if len(parts) not in (3, 4):
        raise ValueError(f"config must be WEIGHTS-TILING-FOLDS[-PRECISION], got {config!r}")
    spec, tiling, folds = parts[:3]
    return spec, tiling, folds, parts[3] if len(parts) == 4 else "auto"


def _ensemble_for(spec: str, fold_spec: str, workdir: Path):
    """(manifest, models) of a configuration's WEIGHTS and FOLDS parts."""
    from app.weights import load_ensemble, read_manifest

    if spec == "shipped":
        all_folds = read_manifest(weights_for("shipped", 0, workdir)).fold_numbers()
    else:
        all_folds = list(range(10))
    folds = all_folds if fold_spec == "all" else all_folds[: int(fold_spec)]
    return load_ensemble(weights_for(spec, len(all_folds), workdir), folds)


def run_one(config: str, case_dir: Path, device: str, workdir: Path, label_out: Path) -> dict:
    """Time one configuration in this process: read, bias correction (N4 with its tumour scout, the
    default), preprocess, network, fusion, postprocess, write."""
    import numpy as np
    import torch

    from app.cli import cpu_quota
    from app.conventions import LabelConvention, to_file_labels
    from app.inference import EnsemblePredictor
    from app.io import find_cases, label_image, load_case, write_image_atomic
    from app.pipeline import segment_image
    from app.postprocess import PostprocessConfig

    torch.set_num_threads(cpu_quota())
    spec, tiling, fold_spec, precision = parse_config(config)
    manifest, models = _ensemble_for(spec, fold_spec, workdir)
    predictor = EnsemblePredictor(device=device, precision=precision, **predictor_options(tiling))
    predictor.load_models(models)
    [case] = find_cases(case_dir).cases
    if predictor.device.type == "cuda":  # warm-up: cuDNN autotuning and lazy CUDA init are one-off costs
        segment_image(predictor, load_case(case).image, PostprocessConfig())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, float] = {}
    start = clock = time.perf_counter()
    loaded = load_case(case)
    times["read"] = time.perf_counter() - clock
    # The product's own path (predict, fuse, post-process, confidence); it reports its stage timings.
    segmentation = segment_image(predictor, loaded.image, PostprocessConfig())
    times.update(segmentation.timings)
    internal = segmentation.labels
    clock = time.perf_counter()
    labels = to_file_labels(internal, LabelConvention.BRATS2023)
    write_image_atomic(label_image(labels, loaded.reference), workdir / f"{config}.nii.gz")
    times["write"] = time.perf_counter() - clock
    times["total"] = time.perf_counter() - start
    np.save(label_out, internal)
    gpu = torch.cuda.max_memory_allocated() / 2**30 if predictor.device.type == "cuda" else None
    # The folds run (the first len(models), as _ensemble_for picks them); 8+16: a combined ensemble.
    widths = "+".join(str(w) for w in sorted({f.width for f in manifest.folds[: len(models)]}))
    return {
        "config": config, "width": widths, "folds": len(models), "tiling": tiling,
        "precision": predictor.precision.value,
        "device": predictor.device.type, **{k: round(v, 2) for k, v in times.items()},
        "peak_ram_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "gpu_mem_gb": None if gpu is None else round(gpu, 2),
    }


def _agreement(a_path: Path, b_path: Path) -> dict[str, float]:
    import numpy as np

    from app.metrics import region_dice

    return region_dice(np.load(a_path), np.load(b_path))


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from app.cli import cpu_quota

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{cpu}, {cpu_quota()} CPU thread(s) used, {memory:.0f} GiB RAM"
    if device == "cuda":
        import torch

        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def _run_child(config: str, case_root: Path, device: str, workdir: Path) -> dict | None:
    """One configuration timed in its own process (peak RAM and GPU memory are its alone)."""
    child = subprocess.run([sys.executable, __file__, "--one", config, "--case", str(case_root), "--device",
                            device, "--workdir", str(workdir)], capture_output=True, text=True)
    line = [out for out in child.stdout.splitlines() if out.startswith("ROW ")]
    if child.returncode != 0 or not line:
        print(f"{config}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[0].removeprefix("ROW "))


COLUMNS = ["config", "device", "width", "folds", "tiling", "precision", "read", "bias_correction", "preprocess",
           "network", "fusion", "postprocess", "write", "total", "peak_ram_gb", "gpu_mem_gb"]


def _print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in COLUMNS) + " |")


def _print_agreements(rows: list[dict], workdir: Path) -> None:
    """Every other tiling against every paper-tiling run of the same weights and folds (fp32, auto, ...)."""
    by_config = {r["config"]: r for r in rows}
    for fast in [c for c in by_config if by_config[c]["tiling"] != "paper"]:
        spec, _, fold_spec, _ = parse_config(fast)
        for paper in [c for c in by_config if by_config[c]["tiling"] == "paper"
                      and parse_config(c)[0::2] == (spec, fold_spec)]:
            dice = _agreement(workdir / f"{fast}.npy", workdir / f"{paper}.npy")
            speedup = by_config[paper]["network"] / max(by_config[fast]["network"], 1e-9)
            print(f"\n{fast} vs {paper}: network {speedup:.1f}x faster, end-to-end "
                  f"{by_config[paper]['total'] / by_config[fast]['total']:.1f}x; mask agreement Dice "
                  + ", ".join(f"{k} {v:.4f}" for k, v in dice.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to benchmark")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated WEIGHTS-TILING-FOLDS, WEIGHTS = shipped or wN (random width N), "
                             "TILING = fast, whole (fast with whole-brain tiles), paper, papershiftN "
                             "(paper grid moved N voxels) or tDxHxWmM (fast with tiles up to DxHxW and margin M), "
                             "FOLDS = a count or all")
    parser.add_argument("--case", type=Path, default=None, help="case folder to use (default: a generated phantom)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights folder benchmarked as 'shipped' (default: the repository's weights/)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="also print the raw rows as JSON")
    args = parser.parse_args()
    if args.weights is not None:  # children inherit it through the environment
        os.environ["OMNET_BENCH_WEIGHTS"] = str(args.weights.resolve())
        global SHIPPED
        SHIPPED = args.weights.resolve()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="omnet-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:  # child process: one configuration
        row = run_one(args.one, args.case, args.device, workdir, workdir / f"{args.one}.npy")
        print("ROW " + json.dumps(row))
        return 0
    case_root = args.case
    if case_root is None:
        from app.phantoms import generate

        case_root = workdir / "case"
        if not case_root.exists():
            generate(case_root, 1, seed=999)
    rows = [row for row in (_run_child(c, case_root, args.device, workdir) for c in args.configs.split(",")) if row]
    print(f"Machine: {machine_description(args.device)}\n")
    _print_table(rows)
    _print_agreements(rows, workdir)
    if args.json:
        print(json.dumps(rows))
    return 0 if len(rows) == len(args.configs.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
