"""Fold checkpoints in safetensors with a manifest that records config, data, scores and sha256 sums.

Weights are never loaded through pickle: safetensors holds only tensors, the manifest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import one_line
from .model import build_model
from .options import Variant

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "omnet-cga-weights/1"
# The repository's own shipped ensemble, used when --weights is not given.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class WeightsError(Exception):
    """The weights folder cannot be used (missing, inconsistent or tampered with)."""


@dataclass(frozen=True)
class FoldWeights:
    fold: int
    path: Path
    sha256: str
    width: int  # the fold's own when its record names one (an ensemble of two widths), else the manifest's


@dataclass(frozen=True)
class Manifest:
    folder: Path
    variant: str
    width: int
    folds: tuple[FoldWeights, ...]
    raw: dict[str, Any]

    def fold_numbers(self) -> list[int]:
        return [f.fold for f in self.folds]

    def record(self, fold: int) -> dict[str, Any]:
        """Fold ``fold``'s row of the manifest as written (scores, provenance)."""
        return next(f for f in self.raw["folds"] if int(f["fold"]) == fold)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(data: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Save tensors atomically as safetensors; returns the file's sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return sha256_of(path)


def write_manifest(folder: Path, variant: str, width: int, folds: list[dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` for fold files already in ``folder``; each fold dict needs ``fold`` and
    ``file`` and may carry scores; the sha256 of each file is computed here."""
    entries = [{**f, "sha256": sha256_of(Path(folder) / f["file"])} for f in folds]
    manifest = {"format": MANIFEST_FORMAT, "variant": variant, "width": width, **(extra or {}), "folds": entries}
    write_json_atomic(manifest, Path(folder) / MANIFEST_NAME)
    return manifest


def read_manifest(folder: Path | str) -> Manifest:
    """Parse and check a weights folder's manifest (every listed file present with its sha256)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise WeightsError(f"no {MANIFEST_NAME} in weights folder {folder}")
    try:
        raw = json.loads(path.read_text())
        variant, width = str(raw["variant"]), int(raw["width"])
        folds = tuple(
            FoldWeights(int(f["fold"]), folder / str(f["file"]), str(f["sha256"]), int(f.get("width", width)))
            for f in raw["folds"]
        )
    except KeyError as err:
        raise WeightsError(f"malformed {path}: no {err} entry") from None
    except (ValueError, TypeError) as err:
        raise WeightsError(f"malformed {path}: {err}") from None
    if variant not in {v.value for v in Variant}:
        raise WeightsError(f"{path}: unknown variant {variant!r}")
    if not folds:
        raise WeightsError(f"{path}: lists no folds")
    return Manifest(folder, variant, width, folds, raw)


def select_folds(manifest: Manifest, folds: list[int] | None) -> list[FoldWeights]:
    """The requested folds (all when None), each verified against its sha256 before any case is read."""
    by_number = {f.fold: f for f in manifest.folds}
    wanted = manifest.fold_numbers() if folds is None else folds
    chosen = []
    for number in wanted:
        if number not in by_number:
            raise WeightsError(f"fold {number} is not in {manifest.folder / MANIFEST_NAME} (has {sorted(by_number)})")
        entry = by_number[number]
        if not entry.path.is_file():
            raise WeightsError(f"manifest names fold {number} file {entry.path}, which is missing")
        actual = sha256_of(entry.path)
        if actual != entry.sha256:
            raise WeightsError(f"{entry.path}: sha256 {actual[:12]}... differs from the manifest's "
                               f"{entry.sha256[:12]}...")
        chosen.append(entry)
    return chosen


def load_fold(manifest: Manifest, entry: FoldWeights) -> nn.Module:
    """Build the fold's network and load its tensors (strict: every key must match)."""
    model = build_model(manifest.variant, entry.width)
    try:
        state = load_file(str(entry.path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        raise WeightsError(f"{entry.path}: cannot load fold {entry.fold}: {one_line(err)}") from None
    return model.eval()


def load_ensemble(folder: Path | str, folds: list[int] | None = None) -> tuple[Manifest, list[nn.Module]]:
    manifest = read_manifest(folder)
    entries = select_folds(manifest, folds)
    return manifest, [load_fold(manifest, e) for e in entries]


def average_ensembles(base: Path | str, tuned: Path | str, out: Path | str, alpha: float) -> dict[str, Any]:
    """Write, fold by fold, ``(1 - alpha) * base + alpha * tuned`` into a new weights folder (WiSE-FT).

    Every floating-point tensor is interpolated, BatchNorm running statistics included; integer tensors
    (BatchNorm's step counters) come from ``tuned``. Each fold of ``tuned`` needs the same fold in ``base``
    with the same variant, width and tensor shapes: averaging only makes sense between a network and its own
    fine-tune. The new manifest keeps ``tuned``'s fold records and adds an ``averaged`` record naming both
    inputs, ``alpha`` and each input file's sha256, so the result can be rebuilt and checked.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base_manifest, tuned_manifest = read_manifest(base), read_manifest(tuned)
    out = _new_folder_for(out, base_manifest, tuned_manifest)
    tuned_entries = select_folds(tuned_manifest, None)
    base_entries = {e.fold: e for e in select_folds(base_manifest, [e.fold for e in tuned_entries])}
    for entry in tuned_entries:
        if base_entries[entry.fold].width != entry.width:
            raise WeightsError(f"width differs: fold {entry.fold} has width {base_entries[entry.fold].width} in "
                               f"{base_manifest.folder}, {entry.width} in {tuned_manifest.folder}")
    out.mkdir(parents=True, exist_ok=True)
    fold_records, sources = [], []
    for entry in tuned_entries:
        mixed = _interpolate(load_file(str(base_entries[entry.fold].path)), load_file(str(entry.path)), alpha,
                             f"fold {entry.fold}")
        name = f"fold_{entry.fold}.safetensors"
        save_state(mixed, out / name)
        record = tuned_manifest.record(entry.fold)
        fold_records.append({**{k: v for k, v in record.items() if k != "sha256"}, "file": name})
        sources.append({"fold": entry.fold, "base_sha256": base_entries[entry.fold].sha256,
                        "tuned_sha256": entry.sha256})
    kept = {k: v for k, v in tuned_manifest.raw.items() if k not in {"format", "variant", "width", "folds"}}
    averaged = {"base": str(base_manifest.folder), "tuned": str(tuned_manifest.folder), "alpha": alpha,
                "rule": "(1 - alpha) * base + alpha * tuned, every floating-point tensor (BatchNorm statistics "
                        "too); integer tensors from tuned",
                "sources": sources}
    return write_manifest(out, tuned_manifest.variant, tuned_manifest.width, fold_records,
                          {**kept, "averaged": averaged})


def combine_ensembles(base: Path | str, replacement: Path | str, out: Path | str) -> dict[str, Any]:
    """Write a new weights folder: ``base``'s folds, each fold of ``replacement`` in place of the same fold
    (or added, when ``base`` lacks it: an ensemble assembled a few folds at a time).

    The two may differ in width (each fold record then names its own); the variant must be the same, since
    the ensemble averages the tasks' probabilities fold by fold. A replaced fold's record is the
    replacement's, with the replacement's ``training`` record inside it, so every fold keeps its provenance;
    the manifest's top-level records are ``base``'s, plus a ``combined`` record naming both inputs and every
    input file's sha256 (and, under ``previous``, ``base``'s own ``combined`` record when it has one).
    """
    base_manifest, new_manifest = read_manifest(base), read_manifest(replacement)
    out = _new_folder_for(out, base_manifest, new_manifest)
    chosen = {e.fold: (base_manifest, e) for e in select_folds(base_manifest, None)}
    chosen.update({e.fold: (new_manifest, e) for e in select_folds(new_manifest, None)})
    out.mkdir(parents=True, exist_ok=True)
    fold_records, sources = [], []
    for _, (manifest, entry) in sorted(chosen.items()):
        name = f"fold_{entry.fold}.safetensors"
        shutil.copyfile(entry.path, out / name)  # verified against its sha256 by select_folds
        record = manifest.record(entry.fold)
        replaced = manifest is new_manifest and "training" in manifest.raw
        extra = {"training": manifest.raw["training"]} if replaced else {}
        fold_records.append({**{k: v for k, v in record.items() if k != "sha256"}, **extra, "file": name,
                             "width": entry.width})
        sources.append({"fold": entry.fold, "from": str(manifest.folder), "sha256": entry.sha256})
    kept = {k: v for k, v in base_manifest.raw.items() if k not in {"format", "variant", "width", "folds"}}
    combined = {"base": str(base_manifest.folder), "replacement": str(new_manifest.folder),
                "replaced_folds": new_manifest.fold_numbers(), "sources": sources}
    if "combined" in base_manifest.raw:  # an ensemble assembled over several runs keeps each step
        combined["previous"] = base_manifest.raw["combined"]
    return write_manifest(out, base_manifest.variant, base_manifest.width, fold_records,
                          {**kept, "combined": combined})


def _new_folder_for(out: Path | str, first: Manifest, second: Manifest) -> Path:
    """The output folder of a merge of two weights folders, checked: neither input, and the same variant in
    both (the ensemble averages the tasks' probabilities fold by fold)."""
    out = Path(out)
    if out.resolve() in {first.folder.resolve(), second.folder.resolve()}:
        raise ValueError(f"output folder {out} must differ from both inputs")
    if first.variant != second.variant:
        raise WeightsError(f"variant differs: {first.folder} has {first.variant}, {second.folder} has {second.variant}")
    return out


def _interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float,
                 what: str) -> dict[str, torch.Tensor]:
    if base.keys() != tuned.keys():
        only = sorted(set(base) ^ set(tuned))
        raise WeightsError(f"{what}: the two networks' tensors differ (e.g. {only[0]})")
    mixed = {}
    for key, tuned_tensor in tuned.items():
        base_tensor = base[key]
        if base_tensor.shape != tuned_tensor.shape:
            raise WeightsError(f"{what}: {key} has shape {tuple(base_tensor.shape)} in base and "
                               f"{tuple(tuned_tensor.shape)} in tuned")
        if tuned_tensor.is_floating_point():
            # Interpolate in fp32 whatever the stored dtype, then store as the base does.
            mixed[key] = ((1 - alpha) * base_tensor.float() + alpha * tuned_tensor.float()).to(base_tensor.dtype)
        else:
            mixed[key] = tuned_tensor
    return mixed
