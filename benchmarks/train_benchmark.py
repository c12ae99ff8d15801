"""Training throughput: step time and patches per second by width, device and augmentation level, and
the cost of this repository's batched augmentation against MONAI's per-patch transforms doing the same job.

    python3 benchmarks/train_benchmark.py [--device cpu|cuda] [--widths 8,32] [--batch 20] [--steps 10]
        [--patch-size 24,48,48] [--compile off,on]

Cases are four half-size phantoms prepared in memory (the step time does not depend on the case size).
Prints a Markdown table; a step is one SGD step of all three tasks (3 x batch patches of --patch-size,
16x32x32 by default), eager or through torch.compile (--compile off,on).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.augment import AugmentConfig, augment_batch  # noqa: E402
from app.inference import resolve_device  # noqa: E402
from app.model import build_model  # noqa: E402
from app.tiling import DIVISOR, poolable  # noqa: E402
from app.train import (  # noqa: E402
    PATCH,
    TrainConfig,
    _batch,
    make_optimizer,
    phantom_cases,
    prepare_case,
    step_network,
    to_device,
    train_step,
    training_autocast,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(width: int, augment: str, batch: int, steps: int, data, device: torch.device,
               patch: tuple[int, int, int] = PATCH, compiled: bool = False) -> float:
    """Seconds per training step (all three tasks active), after three warm-up steps (which hold the
    compiling when ``compiled``)."""
    cfg = TrainConfig(width=width, batch=batch, stage_steps=(0, 0, 10**6), augment=augment, device=device.type,
                      patch_size=patch, compile=compiled)
    model = build_model(cfg.variant, cfg.width).to(device, memory_format=torch.channels_last_3d).train()
    optimizer = make_optimizer(model, cfg)
    stepped = step_network(model, cfg)
    rng = np.random.default_rng(0)
    level = AugmentConfig.for_level(augment)
    generator = torch.Generator(device=device).manual_seed(0)
    use_amp = training_autocast("auto", device)
    for step in range(steps + 3):
        if step == 3:
            _sync(device)
            started = time.perf_counter()
        train_step(stepped, optimizer, data, cfg, 10**5, rng, device, use_amp, level, generator)
    _sync(device)
    return (time.perf_counter() - started) / steps


def time_augmentation(augment: str, batch: int, steps: int, data, device: torch.device,
                      patch: tuple[int, int, int] = PATCH) -> float:
    """Seconds to augment one step's batch (3 x batch patches) with app.augment."""
    rng = np.random.default_rng(0)
    cfg = AugmentConfig.for_level(augment)
    generator = torch.Generator(device=device).manual_seed(0)
    x, y, _, offsets, _ = _batch(data, (0, 1, 2), batch, rng, device, patch_size=patch)
    augment_batch(x, y, offsets, cfg, generator, rng)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        augment_batch(x, y, offsets, cfg, generator, rng)
    _sync(device)
    return (time.perf_counter() - started) / steps


def monai_pipeline():
    """MONAI's transforms for the same job as AugmentConfig's default, applied per patch (MONAI draws its
    random parameters per call); None when MONAI is not installed."""
    try:
        from monai import transforms as mt
    except ImportError:
        return None
    keys = ["image", "label"]
    return mt.Compose([
        mt.RandFlipd(keys, prob=0.5, spatial_axis=0), mt.RandFlipd(keys, prob=0.5, spatial_axis=1),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=2),
        mt.RandAffined(keys, prob=0.3, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                       mode=("bilinear", "nearest"), padding_mode="border"),
        mt.RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.2)),
        mt.RandScaleIntensityd("image", prob=0.3, factors=0.25, channel_wise=True),
        mt.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        mt.RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.2), sigma_y=(0.5, 1.2), sigma_z=(0.5, 1.2)),
        mt.RandSimulateLowResolutiond("image", prob=0.15, zoom_range=(0.25, 0.5)),
        mt.RandGaussianNoised("image", prob=0.2, std=0.1),
    ])


def time_monai(batch: int, steps: int, data, device: torch.device) -> float | None:
    pipeline = monai_pipeline()
    if pipeline is None:
        return None
    pipeline.set_random_state(0)
    x, y, _, _, _ = _batch(data, (0, 1, 2), batch, np.random.default_rng(0), device)
    started = time.perf_counter()
    for _ in range(steps):
        out = [pipeline({"image": x[i], "label": y[i][None]}) for i in range(x.shape[0])]
        torch.stack([o["image"] for o in out])
    _sync(device)
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to train on")
    parser.add_argument("--widths", default="8,32", help="comma-separated network widths")
    parser.add_argument("--augment", default="none,default,strong", help="comma-separated augmentation levels")
    parser.add_argument("--batch", type=int, default=20, help="patches per task per step (the paper: 20)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--patch-size", default="16,32,32", help="training patch D,H,W (train's --patch-size)")
    parser.add_argument("--compile", default="off", help="comma-separated: off (eager), on (torch.compile, "
                        "train's --compile); both rows per width and level when 'off,on'")
    args = parser.parse_args()
    patch = tuple(int(v) for v in args.patch_size.split(","))
    compile_modes = args.compile.split(",")
    if len(patch) != 3 or any(m not in ("off", "on") for m in compile_modes):
        parser.error("--patch-size takes D,H,W and --compile takes off, on or off,on")
    if not poolable(patch):  # train's own check: the network pools three times
        parser.error(f"--patch-size {args.patch_size}: every side must be a positive multiple of {DIVISOR}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = [to_device(prepare_case(c), device) for c in phantom_cases(4, 900, (120, 120, 78))]
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads{gpu}, "
          f"batch {args.batch}/task, patch {'x'.join(map(str, patch))}\n")
    print("| device | width | augment | compile | step (ms) | patches/s | augmentation alone (ms) | share of step |")
    print("|---|---|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        for level in args.augment.split(","):
            aug = time_augmentation(level, args.batch, args.steps, data, device, patch) if level != "none" else 0.0
            for mode in compile_modes:
                step = time_steps(width, level, args.batch, args.steps, data, device, patch, mode == "on")
                print(f"| {device.type} | {width} | {level} | {mode} | {step * 1e3:.0f} | "
                      f"{3 * args.batch / step:.0f} | {aug * 1e3:.0f} | {aug / step:.0%} |", flush=True)
    monai = time_monai(args.batch, max(2, args.steps // 2), data, device)
    if monai is not None:
        ours = time_augmentation("default", args.batch, args.steps, data, device)
        print(f"\nAugmenting one step's {3 * args.batch} patches (default level): app.augment {ours * 1e3:.0f} ms, "
              f"MONAI per-patch transforms {monai * 1e3:.0f} ms ({monai / ours:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
