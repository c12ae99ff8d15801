"""Test helpers: randomly initialised weights folders and small phantom cases on disk.

Random weights only exercise I/O and plumbing; nothing may present their output as a segmentation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk
import torch

from app.conventions import Layout
from app.model import build_model
from app.phantoms import generate
from app.weights import save_state, write_manifest

ROOT = Path(__file__).resolve().parent.parent
SMALL = (64, 64, 48)


def random_weights(folder: Path, variant: str = "omnet_cga", width: int = 4, folds: int = 2, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for fold in range(folds):
        torch.manual_seed(seed + fold)
        model = build_model(variant, width)
        save_state(model.state_dict(), folder / f"fold_{fold}.safetensors")
        entries.append({"fold": fold, "file": f"fold_{fold}.safetensors"})
    write_manifest(folder, variant, width, entries, {"note": "random initialisation, for tests only"})
    return folder


def small_cases(folder: Path, n: int = 2, seed: int = 11, layout: Layout = Layout.BRATS2023, size=SMALL) -> list[Path]:
    return generate(folder, n, seed, layout, size)


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600, user: str | None = None):
    """Run ``./run.sh`` (or ``python3 -m app`` when args start with '-m') as a real subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    command = [str(ROOT / "run.sh"), *args]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def python_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def relabel_edema(seg: Path, label: int, every: int = 1) -> None:
    """Mark the edema (2) of every ``every``-th axial slice of the ground truth ``seg`` as ``label``, in place."""
    image = sitk.ReadImage(str(seg))
    labels = sitk.GetArrayFromImage(image)
    labels[::every][labels[::every] == 2] = label
    relabelled = sitk.GetImageFromArray(labels)
    relabelled.CopyInformation(image)
    sitk.WriteImage(relabelled, str(seg), True)
