"""QC pictures: axial, coronal and sagittal slices through the tumour's centre, FLAIR and T1c underneath,
labels in the colours of the paper's Fig. 7 (edema green, NCR/NET blue, ET red), legend and case ID, and a
prediction's confidence and warnings above them (a folder of pictures is read without the report)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

from .conventions import EDEMA, ENHANCING, NECROSIS, LabelConvention, Modality, from_file_labels
from .io import CaseError, CaseFiles, LoadedCase, load_case

COLOURS = {EDEMA: (0, 200, 0), NECROSIS: (40, 90, 255), ENHANCING: (255, 30, 30)}
LEGEND = ((EDEMA, "edema (ED)"), (NECROSIS, "NCR/NET"), (ENHANCING, "enhancing (ET)"))
OPACITY = 0.45
PANEL = 220  # pixels of the longest side of each view
NOTE_COLOUR = (255, 170, 0)  # a prediction's confidence and warnings
_LINE = 14  # pixels per line of text (PIL's default font is about 10 pixels high)
_CHAR = 6  # pixels per character, a little over that font's (about 5), for wrapping the notes


def _window(image: np.ndarray) -> np.ndarray:
    """Grey levels from the 1st to 99.5th percentile of the brain's intensities."""
    brain = image[image > 0]
    lo, hi = (np.percentile(brain, (1, 99.5)) if brain.size else (0.0, 1.0))
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def _centre(labels: np.ndarray, fallback: np.ndarray) -> tuple[int, int, int]:
    mask = labels > 0 if labels.any() else fallback
    coords = np.argwhere(mask)
    return tuple(int(round(c)) for c in coords.mean(axis=0)) if coords.size else tuple(s // 2 for s in labels.shape)


def _views(volume: np.ndarray, centre, spacing_zyx) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """(slice, pixel size) for axial, coronal, sagittal; superior and anterior shown up."""
    z, y, x = centre
    sz, sy, sx = spacing_zyx
    return [
        (volume[z][::-1], (sy, sx)),
        (volume[:, y, :][::-1], (sz, sx)),
        (volume[:, :, x][::-1], (sz, sy)),
    ]


def _panel(grey: np.ndarray, labels: np.ndarray, pixel: tuple[float, float]) -> Image.Image:
    rgb = np.repeat((grey * 255)[..., None], 3, axis=2)
    for label, colour in COLOURS.items():
        mask = labels == label
        rgb[mask] = (1 - OPACITY) * rgb[mask] + OPACITY * np.array(colour)
    image = Image.fromarray(rgb.astype(np.uint8))
    height, width = grey.shape[0] * pixel[0], grey.shape[1] * pixel[1]
    scale = PANEL / max(height, width)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.NEAREST)


def render(case_id: str, images: dict[str, np.ndarray], rows: list[tuple[str, str, np.ndarray]],
           spacing_zyx: tuple[float, float, float], notes: Sequence[str] = ()) -> Image.Image:
    """One picture: a row per (title, image name, internal label map), three views each, under the case ID,
    the legend and ``notes`` (each wrapped to the picture's width)."""
    centre = _centre(rows[0][2], images[rows[0][1]] > 0)
    font = ImageFont.load_default()
    panels = [[_panel(_window(g), lab, px) for (g, px), (lab, _) in zip(_views(images[name], centre, spacing_zyx),
                                                                         _views(labels, centre, spacing_zyx))]
              for _, name, labels in rows]
    width = sum(p.width for p in panels[0]) + 120
    lines = [line for note in notes for line in textwrap.wrap(note, width // _CHAR - 2)]
    header = 36 + _LINE * len(lines)
    height = header + sum(max(p.height for p in row) for row in panels)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), f"{case_id}   slice centre (z, y, x) = {centre}", fill=(255, 255, 255), font=font)
    x = 6
    for label, text in LEGEND:
        draw.rectangle((x, 20, x + 10, 30), fill=COLOURS[label])
        draw.text((x + 14, 19), text, fill=(255, 255, 255), font=font)
        x += 24 + 7 * len(text)
    for i, line in enumerate(lines):
        draw.text((6, 36 + _LINE * i), line, fill=NOTE_COLOUR, font=font)
    y = header
    for (title, name, _), row in zip(rows, panels):
        draw.text((6, y + 4), f"{title}", fill=(255, 255, 0), font=font)
        draw.text((6, y + 18), f"on {name}", fill=(200, 200, 200), font=font)
        x = 114
        for panel in row:
            canvas.paste(panel, (x, y))
            x += panel.width
        y += max(p.height for p in row)
    return canvas


def _save(picture: Image.Image, folder: Path, case_id: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case_id}.png"
    tmp = folder / f".{case_id}.png.tmp-{os.getpid()}"
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _modalities(loaded: LoadedCase) -> dict[str, np.ndarray]:
    order = list(loaded.files.modalities)
    return {"FLAIR": loaded.image[order.index(Modality.FLAIR)], "T1c": loaded.image[order.index(Modality.T1C)]}


def _spacing_zyx(reference: sitk.Image) -> tuple[float, float, float]:
    return tuple(reversed(reference.GetSpacing()))  # type: ignore[return-value]


def save_case_picture(loaded: LoadedCase, file_labels: np.ndarray, convention: LabelConvention, folder: Path,
                      notes: Sequence[str] = ()) -> Path:
    """QC picture of a prediction (``predict --qc``), its labels written in ``convention``, with ``notes``
    (its confidence and warnings) above the views."""
    labels = from_file_labels(file_labels, convention)
    images = _modalities(loaded)
    rows = [("prediction", "FLAIR", labels), ("prediction", "T1c", labels)]
    picture = render(loaded.files.case_id, images, rows, _spacing_zyx(loaded.reference), notes)
    return _save(picture, Path(folder), loaded.files.case_id)


def save_evaluation_picture(case: CaseFiles, pred: np.ndarray, truth: np.ndarray, folder: Path) -> Path:
    """QC picture of a prediction beside the ground truth (``evaluate --qc``), both internal label maps;
    raises `CaseError` when the case's images cannot be read or lie on another grid than the labels."""
    loaded = load_case(case)
    if loaded.image.shape[1:] != truth.shape:
        raise CaseError(case.case_id, case.reference, f"the images' grid {loaded.image.shape[1:]} is not the "
                        f"ground truth's {truth.shape}")
    images = _modalities(loaded)
    rows = [("prediction", "FLAIR", pred), ("ground truth", "FLAIR", truth),
            ("prediction", "T1c", pred), ("ground truth", "T1c", truth)]
    picture = render(case.case_id, images, rows, _spacing_zyx(loaded.reference))
    return _save(picture, Path(folder), case.case_id)
