"""Training of OM-Net (+CGA/SE) and the three-model cascade: patch streams, curriculum, online data
transfer, k-fold ensembles, resumable checkpoints (SPEC "Training").

Cases are read through the prediction I/O (`app.io`), so BraTS 2018/2021/2023 training folders work as
they are. Step counts replace the paper's epochs (an epoch of random patches has no fixed size).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .conventions import NORMAL_BRAIN, from_file_labels
from .inference import FAST_TILE, EnsemblePredictor, bounding_box, brain_mask, dilate, native_bf16, normalise
from .io import CaseFiles, find_cases, load_case, load_segmentation
from .metrics import region_dice
from .model import CORE_CLASSES, TUMOUR_CLASSES, Cascade, build_model
from .weights import save_state, write_json_atomic
from .weights import write_manifest as weights_manifest

log = logging.getLogger("omnet.train")

PATCH = (16, 32, 32)
# SPEC "Training": task-2 centres lie in the ground-truth whole tumour dilated by this many voxels.
TASK2_DILATION = 5
TRANSFER_TUMOUR = 0.4
TRANSFER_CORE = 0.5


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in checkpoints and the manifest."""

    variant: str = "omnet_cga"  # omnet | omnet_cga | omnet_se | cascade
    width: int = 32
    folds: int = 10
    stage_steps: tuple[int, int, int] = (1000, 1000, 18000)  # curriculum: task 1, +task 2, +task 3
    curriculum: bool = True  # False: all tasks from step 0 (OM-Net0)
    transfer: bool = True  # online data transfer (OM-Net0 turns it off)
    batch: int = 20  # patches per task per step
    lr: float = 1e-3
    momentum: float = 0.99
    weight_decay: float = 5e-4
    lr_halve_every: int = 4000  # steps (the paper halves every 4 epochs)
    validate_every: int = 500
    val_cases: int = 0  # 0 = the whole held-out fold
    seed: int = 0
    device: str = "auto"
    max_tile: tuple[int, int, int] = FAST_TILE  # validation uses predict's default fast tiling
    init_from: str | None = None  # safetensors model weights to start from (fine-tuning, warm starts)

    @property
    def total_steps(self) -> int:
        return int(sum(self.stage_steps))

    def active_tasks(self, step: int) -> tuple[int, ...]:
        """Tasks trained at ``step`` (0-based): the curriculum adds task 2, then task 3."""
        if not self.curriculum:
            return (0, 1, 2)
        s1, s2, _ = self.stage_steps
        if step < s1:
            return (0,)
        if step < s1 + s2:
            return (0, 1)
        return (0, 1, 2)


# -------------------------------------------------------------------------------------------- data


@dataclass
class TrainingCase:
    """A case prepared for patch sampling: normalised, cropped to the brain, padded by half a patch."""

    case_id: str
    image: np.ndarray  # (4, D, H, W) float32
    target: np.ndarray  # (D, H, W) uint8, internal 5 classes (0 bg, 1 NCR, 2 ED, 3 ET, 4 brain)
    centres: list[np.ndarray]  # per task: flat indices of allowed patch centres


def prepare_case(case: CaseFiles, cache_dir: Path | None = None) -> TrainingCase:
    """Normalise, crop and pad a case and index its sampling regions; with ``cache_dir`` the arrays are
    stored as .npy once and memory-mapped afterwards, so concurrent fold jobs share one copy."""
    if cache_dir is not None:
        cached = _load_cached(case.case_id, cache_dir)
        if cached is not None:
            return cached
    prepared = _prepare(case)
    if cache_dir is not None:
        _store_cached(prepared, cache_dir)
    return prepared


def _cache_paths(case_id: str, cache_dir: Path) -> list[Path]:
    return [cache_dir / f"{case_id}.{part}.npy" for part in ("image", "target", "c0", "c1", "c2")]


def _load_cached(case_id: str, cache_dir: Path) -> TrainingCase | None:
    paths = _cache_paths(case_id, cache_dir)
    if not all(p.is_file() for p in paths):
        return None
    image, target, *centres = (np.load(p, mmap_mode="r") for p in paths)
    return TrainingCase(case_id, image, target, list(centres))


def _store_cached(case: TrainingCase, cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path, array in zip(_cache_paths(case.case_id, cache_dir), [case.image, case.target, *case.centres]):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.npy")
        np.save(tmp, array)
        os.replace(tmp, path)


def _prepare(case: CaseFiles) -> TrainingCase:
    loaded = load_case(case)
    labels = from_file_labels(load_segmentation(case, loaded.reference))
    mask = brain_mask(loaded.image)
    box = bounding_box(mask, 2)
    image = normalise(loaded.image[(slice(None), *box)], mask[box])
    target = labels[box].copy()
    target[(target == 0) & mask[box]] = NORMAL_BRAIN
    half = [p // 2 for p in PATCH]
    image = np.pad(image, [(0, 0)] + [(h, h) for h in half])
    target = np.pad(target, [(h, h) for h in half])
    tumour = np.isin(target, TUMOUR_CLASSES)
    core = np.isin(target, CORE_CLASSES)
    inner = np.zeros_like(tumour)
    inner[tuple(slice(h, -h) for h in half)] = True
    streams = [(target > 0) & inner, dilate(tumour, TASK2_DILATION) & inner, core & inner]
    # Cases without tumour (or core) fall back to the brain so every stream can always sample.
    centres = [np.flatnonzero(s if s.any() else streams[0]) for s in streams]
    return TrainingCase(case.case_id, image, target, centres)


def sample_patches(cases: Sequence[TrainingCase], task: int, count: int, rng: np.random.Generator):
    """``count`` patches whose centres lie in ``task``'s region of randomly chosen cases."""
    images, targets = [], []
    for _ in range(count):
        case = cases[rng.integers(len(cases))]
        flat = case.centres[task][rng.integers(len(case.centres[task]))]
        centre = np.unravel_index(flat, case.target.shape)
        window = tuple(slice(c - p // 2, c - p // 2 + p) for c, p in zip(centre, PATCH))
        images.append(case.image[(slice(None), *window)])
        targets.append(case.target[window])
    return np.stack(images), np.stack(targets)


def task_targets(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-task label maps: tasks 1 and 2 use the 5 classes, task 3 is ET vs the rest."""
    return target, target, (target == 3).long()


def transfer_masks(target: torch.Tensor, origin: torch.Tensor, enabled: bool) -> list[torch.Tensor]:
    """Which patches enter each task's loss (SPEC online data transfer).

    ``origin`` is the stream each patch was sampled for (0, 1, 2). A task-1 patch with >= 40% tumour voxels
    also enters task 2; a task-1 or task-2 patch with >= 50% core voxels also enters task 3.
    """
    own = [origin == t for t in range(3)]
    if not enabled:
        return own
    voxels = target[0].numel()
    tumour_frac = torch.isin(target, torch.tensor(TUMOUR_CLASSES, device=target.device)).flatten(1).sum(1) / voxels
    core_frac = torch.isin(target, torch.tensor(CORE_CLASSES, device=target.device)).flatten(1).sum(1) / voxels
    to_task2 = own[0] & (tumour_frac >= TRANSFER_TUMOUR - 1e-9)
    to_task3 = (own[0] | own[1]) & (core_frac >= TRANSFER_CORE - 1e-9)
    return [own[0], own[1] | to_task2, own[2] | to_task3]


# --------------------------------------------------------------------------------------- optimiser


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD as the authors' solver: weight decay on weights, biases at 2x lr without decay."""
    weights, biases = [], []
    for name, param in model.named_parameters():
        (biases if name.endswith("bias") else weights).append(param)
    return torch.optim.SGD(
        [
            {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
            {"params": biases, "lr": 2 * cfg.lr, "weight_decay": 0.0, "lr_mult": 2.0},
        ],
        lr=cfg.lr, momentum=cfg.momentum,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    lr = cfg.lr * 0.5 ** (step // cfg.lr_halve_every)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr


def build_network(cfg: TrainConfig) -> nn.Module:
    return Cascade(cfg.width) if cfg.variant == "cascade" else build_model(cfg.variant, cfg.width)


# ------------------------------------------------------------------------------------- checkpoints


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            buf = optimizer.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                state[f"momentum.{names[id(param)]}"] = buf
    return state


def _restore_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, device) -> None:
    state = load_file(str(path), device=str(device))
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=True)
    params = dict(model.named_parameters())
    for key, value in state.items():
        if key.startswith("momentum."):
            optimizer.state[params[key[9:]]]["momentum_buffer"] = value


# ---------------------------------------------------------------------------------------- training


@dataclass
class FoldResult:
    fold: int
    best_score: float
    best_step: int
    best_dice: dict[str, float]
    steps: int
    val_cases: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)


def split_folds(case_ids: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    """Deterministic k-fold split of case IDs (shuffled by ``seed``)."""
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    if len(case_ids) < folds:
        raise ValueError(f"{len(case_ids)} cases cannot make {folds} folds")
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    return [sorted(order[k::folds].tolist()) for k in range(folds)]


@dataclass
class ValidationCase:
    case_id: str
    image: np.ndarray  # raw (4, D, H, W)
    truth: np.ndarray  # internal labels


def load_validation(cases: Sequence[CaseFiles]) -> list[ValidationCase]:
    out = []
    for case in cases:
        loaded = load_case(case)
        truth = from_file_labels(load_segmentation(case, loaded.reference))
        out.append(ValidationCase(case.case_id, loaded.image, truth))
    return out


def evaluate_cases(model: nn.Module, cases: Sequence[ValidationCase], cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean WT/TC/ET Dice of the fused (not post-processed) prediction on full held-out cases."""
    predictor = EnsemblePredictor(device=device.type, tiling="fast", max_tile=cfg.max_tile)
    predictor.load_models([model])
    scores = [region_dice(predictor.predict_labels(c.image), c.truth) for c in cases]
    model.train()
    return {k: float(np.mean([s[k] for s in scores])) for k in ("WT", "TC", "ET")}


def train_fold(cfg: TrainConfig, train_cases: Sequence[CaseFiles], val_cases: Sequence[CaseFiles],
               fold_dir: Path, fold: int, progress: bool = True, cache_dir: Path | None = None,
               time_limit: float | None = None) -> FoldResult:
    """Train one fold with resumable checkpoints in ``fold_dir``; keeps the best-validating snapshot.

    ``time_limit`` (seconds) ends training early at a validation point once exceeded (a cluster job's
    wall time); it counts from the end of data preparation. The steps actually done are recorded.
    """
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed * 1000 + fold)
    # Channels-last: 1.7x faster training steps on this CPU (oneDNN), the layout cuDNN prefers too.
    model = build_network(cfg).to(device, memory_format=torch.channels_last_3d).train()
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng([cfg.seed, fold])
    state_path, meta_path = fold_dir / "last.safetensors", fold_dir / "last.json"
    best_path = fold_dir / "best.safetensors"
    meta: dict[str, Any] = {"step": 0, "best_score": -1.0, "best_step": -1, "best_dice": {}, "history": []}
    if cfg.init_from and not meta_path.is_file():
        model.load_state_dict(load_file(cfg.init_from, device=str(device)), strict=True)
        log.info("fold %d: initialised from %s", fold, cfg.init_from)
    if meta_path.is_file() and state_path.is_file():
        meta = json.loads(meta_path.read_text())
        _restore_checkpoint(model, optimizer, state_path, device)
        rng.bit_generator.state = meta["rng"]
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        log.info("fold %d: resumed at step %d", fold, meta["step"])
    if meta["step"] >= cfg.total_steps:
        return _fold_result(fold, meta, val_cases)
    log.info("fold %d: preparing %d training cases", fold, len(train_cases))
    data = [prepare_case(c, cache_dir) for c in train_cases]
    validation = load_validation(val_cases)
    started = time.monotonic()
    # bf16 autocast only where bf16 is native on a GPU (emulated bf16 on pre-Ampere GPUs is slower than
    # fp32); CPU training stays fp32: bf16 steps were 1.34x faster there, but their convergence is untested.
    use_amp = device.type == "cuda" and native_bf16(device)
    bar = _progress_bar(cfg.total_steps, meta["step"], f"fold {fold}", progress)
    running = meta.get("running")
    for step in range(meta["step"], cfg.total_steps):
        lr = set_learning_rate(optimizer, cfg, step)
        losses = train_step(model, optimizer, data, cfg, step, rng, device, use_amp)
        total = sum(losses.values())
        running = total if running is None else 0.9 * running + 0.1 * total
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.1e}", tasks=len(cfg.active_tasks(step)))
        done = step + 1
        out_of_time = time_limit is not None and time.monotonic() - started > time_limit
        if done % cfg.validate_every == 0 or done == cfg.total_steps or out_of_time:
            dice = evaluate_cases(model, validation, cfg, device)
            score = float(np.mean(list(dice.values())))
            entry = {"step": done, "loss": round(running, 5), **{k: round(v, 4) for k, v in losses.items()},
                     **{f"dice_{k}": round(v, 4) for k, v in dice.items()}}
            meta["history"].append(entry)
            log.info("fold %d step %d: loss %.4f dice WT %.3f TC %.3f ET %.3f", fold, done, running,
                     dice["WT"], dice["TC"], dice["ET"])
            if score > meta["best_score"]:
                meta.update(best_score=score, best_step=done, best_dice=dice)
                save_state(model.state_dict(), best_path)
            meta["step"] = done
            meta["running"] = running
            meta["rng"] = rng.bit_generator.state
            meta["torch_rng"] = torch.get_rng_state().tolist()
            meta["stopped_early"] = out_of_time and done < cfg.total_steps
            save_state(_checkpoint_state(model, optimizer), state_path)
            write_json_atomic(meta, meta_path)
            if out_of_time:
                log.info("fold %d: time limit reached at step %d", fold, done)
                break
    bar.close()
    return _fold_result(fold, meta, val_cases)


def _fold_result(fold: int, meta: dict[str, Any], val_cases: Sequence[CaseFiles]) -> FoldResult:
    return FoldResult(fold, meta["best_score"], meta["best_step"], meta["best_dice"], meta["step"],
                      [c.case_id for c in val_cases], meta["history"])


def train_step(model, optimizer, data, cfg: TrainConfig, step: int, rng, device, use_amp: bool) -> dict[str, float]:
    tasks = cfg.active_tasks(step)
    images, targets, origins = [], [], []
    for task in tasks:
        x, y = sample_patches(data, task, cfg.batch, rng)
        images.append(x)
        targets.append(y)
        origins.append(np.full(cfg.batch, task))
    x = torch.from_numpy(np.concatenate(images)).to(device).contiguous(memory_format=torch.channels_last_3d)
    y = torch.from_numpy(np.concatenate(targets).astype(np.int64)).to(device)
    origin = torch.from_numpy(np.concatenate(origins)).to(device)
    cascade = cfg.variant == "cascade"
    # Without transfer (the cascade never has it) each task's patches are exactly its own stream's.
    selected = transfer_masks(y, origin, cfg.transfer and not cascade)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        if cascade:  # MC3's networks are independent: each sees only its own task's patches (and BN stats)
            outputs = {task: model.nets[task](x[selected[task]]) for task in tasks}
        else:  # OM-Net's batches of the active tasks go through the backbone together and split at the heads
            outputs = model(x)
    per_task_targets = task_targets(y)
    loss = torch.zeros((), device=device)
    losses = {}
    for task in tasks:
        chosen = selected[task]
        logits = outputs[task] if cascade else outputs[task][chosen]
        task_loss = F.cross_entropy(logits.float(), per_task_targets[task][chosen])
        loss = loss + task_loss
        losses[f"loss_task{task + 1}"] = float(task_loss.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return losses


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=2.0, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------- ensemble


def train_ensemble(cfg: TrainConfig, data_dir: Path, out_dir: Path, only_fold: int | None = None,
                   data_description: dict[str, Any] | None = None, progress: bool = True,
                   cache_dir: Path | None = None, time_limit: float | None = None) -> dict[str, Any]:
    """Train every fold (or ``only_fold``) and (re)write ``out_dir`` as a weights folder for `predict`."""
    found = find_cases(data_dir)
    if found.errors:
        raise ValueError("; ".join(str(e) for e in found.errors))
    cases = [c for c in found.cases if c.segmentation is not None]
    if not cases:
        raise ValueError(f"no cases with ground truth under {data_dir}")
    by_id = {c.case_id: c for c in cases}
    splits = split_folds(list(by_id), cfg.folds, cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fold_numbers = range(cfg.folds) if only_fold is None else [only_fold]
    for fold in fold_numbers:
        if not 0 <= fold < cfg.folds:
            raise ValueError(f"fold {fold} outside 0..{cfg.folds - 1}")
        held_out = splits[fold]
        val_ids = held_out[: cfg.val_cases] if cfg.val_cases else held_out
        train_ids = [i for k, s in enumerate(splits) if k != fold for i in s]
        result = train_fold(cfg, [by_id[i] for i in train_ids], [by_id[i] for i in val_ids],
                            out_dir / "runs" / f"fold_{fold}", fold, progress, cache_dir, time_limit)
        _publish_fold(out_dir, fold, result)
    return write_manifest(out_dir, cfg, data_description or {"path": str(data_dir), "cases": len(cases)})


def _publish_fold(out_dir: Path, fold: int, result: FoldResult) -> None:
    best = out_dir / "runs" / f"fold_{fold}" / "best.safetensors"
    target = out_dir / f"fold_{fold}.safetensors"
    save_state(compact_state(load_file(str(best))), target, metadata={"fold": str(fold)})
    write_json_atomic(asdict(result), out_dir / "runs" / f"fold_{fold}" / "result.json")


# Largest magnitude float16 holds with margin; tensors beyond it stay float32.
_FP16_LIMIT = 6.0e4


def compact_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors as float16 for the published weights (half the size; loading casts back to the
    model's float32, and the ensemble's masks are unaffected beyond rounding)."""
    return {k: v.half() if v.is_floating_point() and v.abs().max() < _FP16_LIMIT else v for k, v in state.items()}
    write_json_atomic(asdict(result), out_dir / "runs" / f"fold_{fold}" / "result.json")


def write_manifest(out_dir: Path, cfg: TrainConfig, data: dict[str, Any]) -> dict[str, Any]:
    """Manifest over every finished fold in ``out_dir`` (folds trained as separate jobs are merged)."""
    folds = []
    for result_path in sorted(out_dir.glob("runs/fold_*/result.json"), key=lambda p: int(p.parent.name[5:])):
        result = json.loads(result_path.read_text())
        file = f"fold_{result['fold']}.safetensors"
        if (out_dir / file).is_file():
            folds.append({"fold": result["fold"], "file": file, "best_step": result["best_step"],
                          "validation_dice": result["best_dice"], "validation_cases": result["val_cases"]})
    extra = {"training": {"config": _jsonable(asdict(cfg)), "data": data}}
    return weights_manifest(out_dir, cfg.variant, cfg.width, folds, extra)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    return value

