"""Fold checkpoints in safetensors with a manifest that records config, data, scores and sha256 sums.

Weights are never loaded through pickle: safetensors holds only tensors, the manifest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

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


@dataclass(frozen=True)
class Manifest:
    folder: Path
    variant: str
    width: int
    folds: tuple[FoldWeights, ...]
    raw: dict[str, Any]

    def fold_numbers(self) -> list[int]:
        return [f.fold for f in self.folds]


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
            FoldWeights(int(f["fold"]), folder / str(f["file"]), str(f["sha256"])) for f in raw["folds"]
        )
    except (ValueError, KeyError, TypeError) as err:
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
    """Build the manifest's network and load one fold's tensors (strict: every key must match)."""
    model = build_model(manifest.variant, manifest.width)
    try:
        state = load_file(str(entry.path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise WeightsError(f"{entry.path}: cannot load fold {entry.fold}: {first}") from None
    return model.eval()


def load_ensemble(folder: Path | str, folds: list[int] | None = None) -> tuple[Manifest, list[nn.Module]]:
    manifest = read_manifest(folder)
    entries = select_folds(manifest, folds)
    return manifest, [load_fold(manifest, e) for e in entries]
