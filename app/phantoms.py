"""BraTS-like phantom cases: anatomy, tumour sub-regions and SynthSeg-style randomised MRI contrasts.

No BraTS data can be downloaded where this project is built, so training, tests and demonstrations use
these phantoms. Each case is deterministic for (seed, index). Anatomy: a skull-stripped brain with white
matter, folded grey matter, sulcal CSF and lateral ventricles. Tumours: edema around a core of NCR/NET
and, in most cases, an enhancing rim; random size, position and shape; some multifocal; some without ET.
Contrasts follow real MRI qualitatively (ET bright on T1c, edema bright on FLAIR/T2, necrosis dark on T1c,
CSF bright on T2 and dark on FLAIR) with randomised tissue means, bias fields, noise, blur, intensity
scale and stored dtype, so a model must learn shape and relative contrast rather than constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .conventions import LabelConvention, Layout, Modality, to_file_labels

GENERATOR_VERSION = "1.0"
DEFAULT_SIZE = (240, 240, 155)  # x, y, z as BraTS stores it (1 mm isotropic)
# BraTS volumes are LPS-oriented with this origin once read by SimpleITK.
BRATS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
BRATS_ORIGIN = (-0.0, -239.0, 0.0)

# Tissue codes used only inside the generator.
_BG, _WM, _GM, _CSF, _NCR, _ED, _ET = range(7)
WHITE_MATTER, GREY_MATTER, CSF = _WM, _GM, _CSF
_TISSUES = (_WM, _GM, _CSF, _NCR, _ED, _ET)

# Mean intensity ranges per modality and tissue (fractions of the brain's white matter-to-max range).
# The ranges never cross where MRI contrast has a fixed sign (e.g. ET > WM on T1c, CSF < WM on FLAIR).
_CONTRAST = {
    Modality.FLAIR: {_WM: (0.40, 0.50), _GM: (0.52, 0.62), _CSF: (0.05, 0.18), _NCR: (0.45, 0.65), _ED: (0.78, 0.95), _ET: (0.60, 0.80)},
    Modality.T1: {_WM: (0.62, 0.75), _GM: (0.45, 0.55), _CSF: (0.10, 0.22), _NCR: (0.22, 0.35), _ED: (0.38, 0.48), _ET: (0.45, 0.58)},
    Modality.T1C: {_WM: (0.55, 0.65), _GM: (0.42, 0.52), _CSF: (0.10, 0.20), _NCR: (0.15, 0.28), _ED: (0.38, 0.48), _ET: (0.85, 1.00)},
    Modality.T2: {_WM: (0.28, 0.38), _GM: (0.45, 0.55), _CSF: (0.88, 1.00), _NCR: (0.75, 0.90), _ED: (0.68, 0.82), _ET: (0.55, 0.68)},
}
_FILE_TOKENS = {
    Layout.BRATS2023: {Modality.FLAIR: "t2f", Modality.T1: "t1n", Modality.T1C: "t1c", Modality.T2: "t2w"},
    Layout.BRATS2018: {Modality.FLAIR: "flair", Modality.T1: "t1", Modality.T1C: "t1ce", Modality.T2: "t2"},
    Layout.TOOLKIT: {Modality.FLAIR: "flair", Modality.T1: "t1", Modality.T1C: "t1c", Modality.T2: "t2"},
}
_STORED_DTYPES = (np.int16, np.uint16, np.float32, np.int32)


@dataclass
class Phantom:
    """One generated case: images (array order z, y, x) and internal labels 0/1/2/3."""

    case_id: str
    images: dict[Modality, np.ndarray]
    labels: np.ndarray
    tissue: np.ndarray  # generator tissue codes (0 background, 1 WM, 2 GM, 3 CSF); not written to disk


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Smooth random field, roughly unit variance: coarse Gaussian noise, cubic-spline upsampled to a
    quarter-resolution grid, then trilinearly to full size (a full-size spline zoom is 20x slower)."""
    coarse = rng.standard_normal([max(2, round(cells * s / max(shape))) + 2 for s in shape])
    quarter = [max(c, -(-s // 4)) for s, c in zip(shape, coarse.shape)]
    mid = ndimage.zoom(coarse, [q / c for q, c in zip(quarter, coarse.shape)], order=3, mode="nearest")
    full = torch.nn.functional.interpolate(
        torch.from_numpy(mid.astype(np.float32))[None, None], size=shape, mode="trilinear", align_corners=True
    )
    return full[0, 0].numpy()


def _ellipsoid_distance(shape, centre, radii) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) on the grid; broadcasted for memory."""
    axes = [(np.arange(n, dtype=np.float32) - c) / r for n, c, r in zip(shape, centre, radii)]
    return np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int], scale: float) -> np.ndarray:
    """Tissue map of a skull-stripped brain: WM core, folded GM cortex, sulcal CSF, ventricles."""
    d, h, w = shape
    centre = np.array([d * 0.48, h * 0.5, w * 0.5]) + rng.uniform(-3, 3, 3) * scale
    radii = np.array([62, 84, 68]) * scale * rng.uniform(0.9, 1.08, 3)
    r = _ellipsoid_distance(shape, centre, radii)
    r = r * (1 + 0.06 * _smooth_field(rng, shape, 6))
    tissue = np.zeros(shape, np.uint8)
    brain = r < 1.0
    tissue[brain] = _WM
    # Cortex ~3 mm thick, folded by a higher-frequency field; sulci of CSF cut into it.
    depth = (1.0 - r) * np.mean(radii)
    folds = _smooth_field(rng, shape, 22)
    cortex = brain & (depth < (3.5 + 2.5 * folds) * scale + 2.0 * scale)
    tissue[cortex] = _GM
    sulci = brain & (depth < 7 * scale) & (np.abs(folds) < 0.12)
    tissue[sulci] = _CSF
    tissue[brain & (depth < 1.2 * scale)] = _CSF
    # Lateral ventricles: two tilted ellipsoids either side of the midline.
    for side in (-1, 1):
        vc = centre + np.array([4, -6, side * 9]) * scale + rng.uniform(-2, 2, 3) * scale
        vr = np.array([11, 28, 5.5]) * scale * rng.uniform(0.7, 1.3, 3)
        tissue[_ellipsoid_distance(shape, vc, vr) < 1.0] = _CSF
    return tissue


def _lesion(rng: np.random.Generator, tissue: np.ndarray, scale: float, with_et: bool, size: float):
    """Masks (core, enhancing, edema) of one lesion placed inside the white matter."""
    shape = tissue.shape
    candidates = np.argwhere(tissue[::4, ::4, ::4] == _WM) * 4
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    core_radii = size * scale * rng.uniform(0.75, 1.25, 3)
    # Work in a bounding box around the lesion: the edema reaches at most ~3.5 core radii.
    reach = np.ceil(core_radii.max() * 3.6 + 4).astype(int)
    lo = np.maximum(centre.astype(int) - reach, 0)
    hi = np.minimum(centre.astype(int) + reach + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    r = _ellipsoid_distance(sub_shape, centre - lo, core_radii)
    r = r * (1 + 0.25 * _smooth_field(rng, sub_shape, 5))
    core = r < 1.0
    enhancing = np.zeros_like(core)
    if with_et:
        rim = rng.uniform(0.25, 0.5)  # rim thickness as a fraction of the core radius
        enhancing = core & (r > 1.0 - rim * (1 + 0.3 * _smooth_field(rng, sub_shape, 6)))
    edema_extent = rng.uniform(1.4, 2.6)
    edema = (r < edema_extent * (1 + 0.35 * _smooth_field(rng, sub_shape, 7))) & ~core
    brain = tissue[box] != _BG
    edema &= brain & (tissue[box] != _CSF)  # edema spreads through parenchyma, not into CSF
    full = []
    for mask in (core & brain, enhancing & brain, edema):
        canvas = np.zeros(shape, bool)
        canvas[box] = mask
        full.append(canvas)
    return full


def _tumour_labels(rng: np.random.Generator, tissue: np.ndarray, scale: float) -> np.ndarray:
    labels = np.zeros(tissue.shape, np.uint8)
    with_et = rng.random() < 0.85
    lesions = 1 + int(rng.random() < 0.15) + int(rng.random() < 0.05)
    for k in range(lesions):
        size = rng.uniform(10, 22) if k == 0 else rng.uniform(5, 10)
        core, enhancing, edema = _lesion(rng, tissue, scale, with_et, size)
        labels[edema & (labels == 0)] = 2
        labels[core] = 1
        labels[enhancing] = 3
    return labels


def _contrast(rng: np.random.Generator, tissue: np.ndarray, labels: np.ndarray, modality: Modality) -> np.ndarray:
    """One modality: randomised tissue means, texture, partial-volume blur, bias field, noise."""
    shape = tissue.shape
    region = tissue.copy()
    region[labels == 1], region[labels == 2], region[labels == 3] = _NCR, _ED, _ET
    means = np.zeros(7, np.float32)
    for t in _TISSUES:
        means[t] = rng.uniform(*_CONTRAST[modality][t])
    image = means[region]
    texture = _smooth_field(rng, shape, 40) * rng.uniform(0.01, 0.04)
    image = image + texture * (region != _BG)
    image = ndimage.gaussian_filter(image, rng.uniform(0.4, 1.0))
    bias = np.exp(rng.uniform(0.05, 0.25) * _smooth_field(rng, shape, 3))
    image = image * bias + rng.normal(0, rng.uniform(0.01, 0.04), shape).astype(np.float32)
    image[region == _BG] = 0  # skull-stripped: outside the brain is exactly zero
    return np.clip(image, 0, None)


def _store(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Random intensity scale and stored dtype, as different scanners and converters produce."""
    dtype = _STORED_DTYPES[rng.integers(len(_STORED_DTYPES))]
    scaled = image * rng.uniform(300, 3000)
    if np.issubdtype(dtype, np.integer):
        return np.round(scaled).astype(dtype)
    return scaled.astype(dtype)


def make_phantom(seed: int, index: int, size: tuple[int, int, int] = DEFAULT_SIZE, case_id: str | None = None) -> Phantom:
    """Generate phantom number ``index`` of the series ``seed``; ``size`` is (x, y, z) in voxels."""
    if len(size) != 3 or min(size) < 16:
        raise ValueError(f"phantom size must be three integers >= 16, got {size}")
    rng = np.random.default_rng([seed, index])
    shape = (size[2], size[1], size[0])
    scale = min(s / d for s, d in zip(size, DEFAULT_SIZE))
    tissue = _anatomy(rng, shape, scale)
    labels = _tumour_labels(rng, tissue, scale)
    images = {m: _store(rng, _contrast(rng, tissue, labels, m)) for m in _CONTRAST}
    return Phantom(case_id or f"PHANTOM-{seed:04d}-{index:05d}", images, labels, tissue)


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin(BRATS_ORIGIN)
    image.SetDirection(BRATS_DIRECTION)
    sitk.WriteImage(image, str(path), True)


def case_id_for(layout: Layout, seed: int, index: int) -> str:
    if layout is Layout.BRATS2023:
        return f"BraTS-PHA-{seed:03d}{index:02d}-000"
    return f"Phantom_{seed:03d}_{index:03d}"


def write_phantom(phantom: Phantom, out_dir: Path, layout: Layout) -> Path:
    """Write a phantom as a case folder in ``layout``, with its ground truth; returns the folder."""
    folder = Path(out_dir) / phantom.case_id
    folder.mkdir(parents=True, exist_ok=True)
    tokens = _FILE_TOKENS[layout]
    convention = LabelConvention.for_layout(layout)
    seg = to_file_labels(phantom.labels, convention)
    if layout is Layout.TOOLKIT:
        names = {m: f"{tokens[m]}.nii.gz" for m in tokens}
        seg_name = "seg.nii.gz"
    else:
        sep = "-" if layout is Layout.BRATS2023 else "_"
        names = {m: f"{phantom.case_id}{sep}{tokens[m]}.nii.gz" for m in tokens}
        seg_name = f"{phantom.case_id}{sep}seg.nii.gz"
    for modality, name in names.items():
        _write(phantom.images[modality], folder / name)
    _write(seg, folder / seg_name)
    return folder


def generate(out_dir: Path, n: int, seed: int, layout: Layout = Layout.BRATS2023,
             size: tuple[int, int, int] = DEFAULT_SIZE, start: int = 0) -> list[Path]:
    """Write ``n`` phantom cases (indices start .. start+n-1) into ``out_dir``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    folders = []
    for index in range(start, start + n):
        phantom = make_phantom(seed, index, size, case_id_for(layout, seed, index))
        folders.append(write_phantom(phantom, out_dir, layout))
    return folders
