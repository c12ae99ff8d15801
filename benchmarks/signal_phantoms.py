"""A second phantom generator, for evaluation only: MR signal equations over a differently built brain.

Everything the project trains on comes from `app/phantoms.py`, and held-out series drawn from it (even from
its wide ranges) share its construction: a model can learn that generator rather than the task. Issue 13's
hidden check runs phantoms nobody here wrote. This script is a stand-in built another way, sharing no code
with `app` (it does not import it), and is never trained on:

- anatomy: two hemispheres split by an interhemispheric fissure, gyri as Voronoi cells on the brain's shell
  (sulci are their walls, not the zero sheets of a noise field), a cortex lining every pial surface, sulcal
  and surface CSF widened by atrophy, a cerebellum with folia and a brainstem, ventricles as chains of balls
  along an arc, caudate, thalamus and putamen, and, in half the cases, white-matter lesions that are not tumour
  (bright on FLAIR and T2, as small-vessel disease is) and an enhancing choroid plexus;
- tumour: a lobulated core (a smoothed union of balls), necrosis deeper than an enhancing rim, or a solid
  enhancing core, or a core without enhancement, or patchy enhancement; edema that follows the white matter
  and mostly spares the cortex; one lesion in ten has a satellite;
- contrast: each voxel's T1, T2 and proton density (literature values at 1.5-3 T, jittered per case and
  textured per voxel) through spin-echo (T1, T2) and inversion-recovery (FLAIR, CSF nulled) signal equations
  with drawn TR, TE and TI; gadolinium shortens T1 where the tumour enhances;
- acquisition: partial-volume blur, a polynomial bias field shared by the modalities with a part of each
  modality's own (log std 0.04-0.22), Rician noise (SNR 12-50 against white matter), 2D-acquired FLAIR and
  T2 in thick slices in a third of the cases, a drawn intensity scale, int16 or float32 files;
- files: BraTS 2021 layout (`<ID>/<ID>_{flair,t1,t1ce,t2,seg}.nii.gz`, ET = 4), 240x240x155 at 1 mm,
  LPS direction, as BraTS distributes them.

    python3 benchmarks/signal_phantoms.py --out DIR [--n 12] [--seed 1] [--size 240,240,155]

Deterministic per (seed, index). Its numbers are a second opinion on generalisation, not a target: a model
tuned on these would only have learnt two generators.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

FULL_SIZE = (240, 240, 155)  # x, y, z as BraTS stores it
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # LPS, as SimpleITK reads BraTS files
ORIGIN = (0.0, -239.0, 0.0)

# Tissue classes of this generator (label map codes are BraTS 2021's: 1 NCR/NET, 2 edema, 4 ET).
BG, WM, GM, CSF, DGM, WML, PLEXUS, NCR, ED, ET = range(10)
# T1 (ms), T2 (ms), proton density at 3 T, roughly as the literature gives them; tumour rows are drawn per case.
TISSUE = {WM: (830, 80, 0.69), GM: (1330, 110, 0.80), CSF: (4200, 2000, 1.0), DGM: (1100, 95, 0.76),
          WML: (1150, 140, 0.78), PLEXUS: (1000, 90, 0.8)}
SEQUENCE_FILES = {"flair": "flair", "t1": "t1", "t1c": "t1ce", "t2": "t2"}


@dataclass
class Case:
    case_id: str
    images: dict[str, np.ndarray]  # (z, y, x) per sequence
    labels: np.ndarray  # (z, y, x) uint8, BraTS 2021 codes


def smooth_noise(rng: np.random.Generator, shape, spacing_mm: float) -> np.ndarray:
    """Unit-variance noise varying over about ``spacing_mm``: a coarse Gaussian grid, linearly upsampled."""
    coarse = [max(2, int(round(s / spacing_mm)) + 2) for s in shape]
    # zoom's output side is round(c * s / c), which is s exactly.
    field = ndimage.zoom(rng.standard_normal(coarse).astype(np.float32),
                         [s / c for s, c in zip(shape, coarse)], order=1, mode="nearest")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def grid(shape):
    return np.ogrid[tuple(slice(0, s) for s in shape)]


def ellipsoid(shape, centre, radii) -> np.ndarray:
    z, y, x = grid(shape)
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2


def balls_along_arc(shape, start, end, bulge, radii) -> np.ndarray:
    """Union of balls whose centres follow a quadratic arc from ``start`` to ``end`` bent by ``bulge``."""
    mask = np.zeros(shape, bool)
    z, y, x = grid(shape)
    for t, radius in zip(np.linspace(0, 1, len(radii)), radii):
        c = (1 - t) * np.asarray(start) + t * np.asarray(end) + 4 * t * (1 - t) * np.asarray(bulge)
        lo = [max(int(ci - radius - 1), 0) for ci in c]
        hi = [min(int(ci + radius + 2), s) for ci, s in zip(c, shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        mask[box] |= ((z[box[0], :, :] - c[0]) ** 2 + (y[:, box[1], :] - c[1]) ** 2
                      + (x[:, :, box[2]] - c[2]) ** 2) <= radius ** 2
    return mask


def anatomy(rng: np.random.Generator, shape, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map and each cerebral voxel's depth below the brain's surface (0 elsewhere; tumours grow
    there)."""
    d, h, w = shape
    centre = np.array([d * 0.5, h * 0.5, w * 0.5]) + rng.uniform(-4, 4, 3) * scale
    radii = np.array([60, 86, 67]) * scale * rng.uniform(0.9, 1.08, 3)
    cerebrum = ellipsoid(shape, centre, radii) * (1 + 0.05 * smooth_noise(rng, shape, 40 * scale)) < 1
    cerebrum &= np.arange(d)[:, None, None] > centre[0] - 0.55 * radii[0]  # a flatter base
    cb_centre = centre + np.array([-0.62 * radii[0], 0.5 * radii[1], 0])
    cerebellum = ellipsoid(shape, cb_centre, np.array([20, 27, 50]) * scale) < 1
    stem = ellipsoid(shape, centre + np.array([-0.75 * radii[0], 0.15 * radii[1], 0]),
                     np.array([30, 11, 12]) * scale) < 1
    brain = cerebrum | cerebellum | stem
    depth = ndimage.distance_transform_edt(brain).astype(np.float32)

    # Gyri: Voronoi cells of seeds on the shell; sulci are the cells' walls down to a drawn depth.
    shell = cerebrum & (depth < 28 * scale)
    points = np.argwhere(shell)
    surface = np.argwhere(cerebrum & (depth <= 2))
    seeds = surface[rng.choice(len(surface), int(rng.integers(70, 200)), replace=False)]
    # Walls bent by a smooth displacement of up to a few mm; gap is about twice the distance to a wall.
    bend = np.stack([3 * smooth_noise(rng, shape, 12 * scale)[tuple(points.T)] for _ in range(3)], axis=1)
    distances, _ = cKDTree(seeds).query(points + bend, k=2)
    gap = np.full(shape, np.inf, np.float32)
    gap[tuple(points.T)] = distances[:, 1] - distances[:, 0]
    sulcal_depth = rng.uniform(10, 24) * scale * (1 + 0.25 * smooth_noise(rng, shape, 30 * scale))
    walls = shell & (gap < 1.0) & (depth < sulcal_depth)
    midline = centre[2] + rng.uniform(-0.05, 0.05) * (np.arange(h)[None, :, None] - centre[1])
    fissure = cerebrum & (np.abs(np.arange(w)[None, None, :] - midline) < rng.uniform(0.6, 1.8)) \
        & (depth < rng.uniform(22, 36) * scale)
    folia = cerebellum & (np.abs(np.sin(2 * np.pi * np.arange(d)[:, None, None] / rng.uniform(4, 6)
                                        + 1.5 * smooth_noise(rng, shape, 10 * scale))) < 0.12)
    pial = ~brain | walls | fissure | folia
    to_pial = ndimage.distance_transform_edt(~pial).astype(np.float32)
    thickness = rng.uniform(1.6, 3.2) * scale * (1 + 0.2 * smooth_noise(rng, shape, 20 * scale))

    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = WM
    tissue[brain & (to_pial < thickness)] = GM
    cb_core = ellipsoid(shape, cb_centre, np.array([9, 13, 28]) * scale) < 1
    tissue[cerebellum & ~cb_core & (tissue == WM) & (smooth_noise(rng, shape, 5 * scale) > -0.6)] = GM
    # Sulci hold CSF where they open towards the surface, as widely as the brain is atrophic.
    atrophy = rng.uniform(0.4, 1.4) * scale
    tissue[(walls & (gap < atrophy) & (depth < 0.6 * sulcal_depth)) | (fissure & brain)] = CSF
    tissue[folia & (depth < 10 * scale)] = CSF

    # Deep grey matter, then ventricles through it (ventricles from slits to enlarged).
    enlarge = rng.uniform(0.6, 2.0)
    for side in (-1, 1):
        lateral = np.array([0, 0, side])
        for offset, size in (((-8, 6, 11), (12, 16, 9)), ((-14, -10, 23), (10, 16, 6))):  # thalamus, putamen
            c = centre + np.array(offset) * scale * np.array([1, 1, side]) + rng.uniform(-2, 2, 3)
            tissue[(ellipsoid(shape, c, np.array(size) * scale * rng.uniform(0.85, 1.15, 3)) < 1)
                   & (tissue == WM)] = DGM
        front = centre + np.array([6, -30, 9 * side]) * scale
        back = centre + np.array([4, 26, 11 * side]) * scale
        bulge = np.array([14, 0, 3 * side]) * scale
        radii_v = np.linspace(4, 2.5, 16) * scale * enlarge * rng.uniform(0.8, 1.2)
        caudate = balls_along_arc(shape, front + lateral * 5 * scale, centre + np.array([8, 0, 12 * side]) * scale,
                                  bulge * 0.5, np.linspace(6, 3, 8) * scale)
        tissue[caudate & (tissue == WM)] = DGM
        tissue[balls_along_arc(shape, front, back, bulge, radii_v) & brain] = CSF
    third = (np.abs(np.arange(w)[None, None, :] - centre[2]) < 1 + enlarge) \
        & (ellipsoid(shape, centre + np.array([-6, 0, 0]) * scale, np.array([10, 14, 30]) * scale) < 1)
    tissue[third & brain] = CSF
    if rng.random() < 0.5:  # choroid plexus in the ventricles' trigone, enhancing on T1c
        for side in (-1, 1):
            c = centre + np.array([8, 18, 10 * side]) * scale
            tissue[(ellipsoid(shape, c, np.array([3, 4, 3]) * scale) < 1) & (tissue == CSF)] = PLEXUS
    if rng.random() < 0.5:  # white-matter lesions: bright on FLAIR and T2, not tumour
        candidates = np.argwhere(tissue[::3, ::3, ::3] == WM) * 3
        for c in candidates[rng.choice(len(candidates), int(rng.integers(2, 14)))]:
            r = rng.uniform(1.5, 4) * scale
            tissue[(ellipsoid(shape, c, [r, r * rng.uniform(1, 2), r]) < 1) & (tissue == WM)] = WML
    return tissue, np.where(cerebrum, depth, 0)


def lesion(rng: np.random.Generator, tissue: np.ndarray, depth: np.ndarray, scale: float, radius: float,
           kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core, enhancing and edema masks of one lesion centred in the cerebrum's parenchyma, most of its
    core inside the brain (``depth``: the cerebrum's depth map)."""
    shape = tissue.shape
    parenchyma = np.isin(tissue[::4, ::4, ::4], (WM, GM, DGM))
    sub_depth = depth[::4, ::4, ::4]
    deep = parenchyma & (sub_depth > min(0.7 * radius, 0.5 * float(sub_depth.max())))
    inside = np.argwhere(deep if deep.any() else parenchyma & (sub_depth > 0)) * 4
    centre = inside[rng.integers(len(inside))]
    reach = int(radius * 4 + 40 * scale)
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = tuple(int(b - a) for a, b in zip(lo, hi))
    local = centre - lo
    blobs = np.zeros(sub, np.float32)
    for _ in range(int(rng.integers(2, 8))):
        c = local + rng.normal(0, 0.45 * radius, 3)
        r = radius * rng.uniform(0.45, 0.85)
        blobs = np.maximum(blobs, (ellipsoid(sub, c, [r, r, r]) < 1).astype(np.float32))
    core = ndimage.gaussian_filter(blobs, max(1.0, 0.15 * radius)) > 0.5
    if not core.any():
        core[tuple(local)] = True
    core &= tissue[box] != BG
    core_depth = ndimage.distance_transform_edt(core)
    rim = rng.uniform(2, 6) * scale
    if kind == "rim":
        enhancing = core & (core_depth <= rim)
    elif kind == "solid":
        enhancing = core.copy()
    elif kind == "patchy":
        enhancing = core & (smooth_noise(rng, sub, 6 * scale) > 0.6)
    else:
        enhancing = np.zeros_like(core)
    outside = ndimage.distance_transform_edt(~core)
    extent = rng.uniform(3, 28) * scale * (1 + 0.35 * smooth_noise(rng, sub, 12 * scale))
    local_tissue = tissue[box]
    white = np.isin(local_tissue, (WM, DGM, WML))
    edema = ~core & (((outside < extent) & white) | ((outside < 0.25 * extent) & (local_tissue == GM)))
    masks = []
    for mask in (core, enhancing, edema):
        full = np.zeros(shape, bool)
        full[box] = mask
        masks.append(full)
    return masks[0], masks[1], masks[2]


def tumour(rng: np.random.Generator, tissue: np.ndarray, depth: np.ndarray, scale: float) -> np.ndarray:
    """BraTS 2021 label map (1 NCR/NET, 2 edema, 4 ET) of one lesion and, one case in ten, a satellite."""
    kind = rng.choice(["rim", "solid", "none", "patchy"], p=[0.6, 0.1, 0.2, 0.1])
    labels = np.zeros(tissue.shape, np.uint8)
    radii = [(rng.uniform(10, 28) if rng.random() < 0.85 else rng.uniform(4, 10)) * scale]
    if rng.random() < 0.1:
        radii.append(rng.uniform(3, 10) * scale)
    for radius in radii:
        core, enhancing, edema = lesion(rng, tissue, depth, scale, radius, kind)
        labels[edema & (labels == 0)] = 2
        labels[core & (labels != 4)] = 1
        labels[enhancing] = 4
    return labels


def relaxation_maps(rng: np.random.Generator, tissue: np.ndarray, labels: np.ndarray, scale: float):
    """Per-voxel T1 (ms), T2 (ms), proton density, the T1 that gadolinium leaves (T1c), and CSF's T1."""
    field = rng.uniform(0.75, 1.05)  # T1 is shorter at 1.5 T than at 3 T
    table = np.zeros((10, 3), np.float32)
    for code, (t1, t2, pd) in TISSUE.items():
        table[code] = (t1 * field * rng.uniform(0.92, 1.08), t2 * rng.uniform(0.9, 1.1), pd * rng.uniform(0.96, 1.04))
    # Tumour tissues relative to the case's white matter: more water, longer T1 and T2.
    white = table[WM]
    table[ED] = (white[0] * rng.uniform(1.7, 2.5), white[1] * rng.uniform(1.8, 3.2), rng.uniform(0.8, 0.88))
    table[NCR] = (white[0] * rng.uniform(2.2, 4.5), white[1] * rng.uniform(2.0, 10.0), rng.uniform(0.85, 0.98))
    table[ET] = (white[0] * rng.uniform(1.5, 2.1), white[1] * rng.uniform(1.2, 2.0), rng.uniform(0.78, 0.88))
    classes = tissue.copy()
    classes[labels == 2], classes[labels == 1], classes[labels == 4] = ED, NCR, ET
    maps = table[classes]
    texture = 1 + rng.uniform(0.015, 0.06) * smooth_noise(rng, tissue.shape, rng.uniform(3, 8) * scale)
    t1, t2, pd = maps[..., 0] * texture, maps[..., 1] * texture, maps[..., 2] / texture ** 0.5
    # Gadolinium: R1 rises by r1 * concentration where the tumour enhances and in the choroid plexus.
    uptake = np.zeros(tissue.shape, np.float32)
    uptake[classes == ET] = rng.uniform(1.0, 2.2) / 1000
    uptake[classes == PLEXUS] = rng.uniform(0.8, 1.6) / 1000
    t1c = 1.0 / (1.0 / np.maximum(t1, 1) + uptake)
    return t1, t2, pd, t1c, float(table[CSF, 0])


def signals(rng: np.random.Generator, t1, t2, pd, t1c, t1_csf: float) -> dict[str, np.ndarray]:
    """Spin-echo T1 and T2, inversion-recovery FLAIR with the inversion time set for this scanner's CSF
    (``t1_csf``), T1c as T1 after gadolinium."""
    tr1, te1 = rng.uniform(400, 750), rng.uniform(8, 14)
    tr2, te2 = rng.uniform(2500, 6000), rng.uniform(80, 120)
    trf, tef = rng.uniform(8000, 11000), rng.uniform(90, 140)
    ti = t1_csf * np.log(2 / (1 + np.exp(-trf / t1_csf))) * rng.uniform(0.93, 1.05)

    def spin_echo(t1_map, tr, te):
        return pd * (1 - np.exp(-tr / t1_map)) * np.exp(-te / t2)

    with np.errstate(divide="ignore"):  # outside the brain T1 and T2 are 0 and the signal 0
        flair = pd * np.abs(1 - 2 * np.exp(-ti / t1) + np.exp(-trf / t1)) * np.exp(-tef / t2)
        return {"flair": flair, "t1": spin_echo(t1, tr1, te1), "t1c": spin_echo(t1c, tr1, te1),
                "t2": spin_echo(t1, tr2, te2)}


def polynomial_field(rng: np.random.Generator, shape, degree: int = 3) -> np.ndarray:
    """A smooth log bias field: a random polynomial in normalised coordinates."""
    z, y, x = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    field = np.zeros(shape, np.float32)
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            for k in range(degree + 1 - i - j):
                if i + j + k:
                    field += rng.normal(0, 1 / (i + j + k)) * (z[:, None, None] ** i) * (y[None, :, None] ** j) \
                        * (x[None, None, :] ** k)
    return field


def thick_slices(image: np.ndarray, axis: int, thickness: float) -> np.ndarray:
    """A 2D acquisition: each slice the mean over its thickness, linearly interpolated back."""
    n = image.shape[axis]
    averaged = ndimage.uniform_filter1d(image, max(1, int(round(thickness))), axis=axis)
    centres = np.arange(thickness / 2, n, thickness)
    sampled = np.take(averaged, np.minimum(np.round(centres).astype(int), n - 1), axis=axis)
    position = np.clip((np.arange(n) - centres[0]) / thickness, 0, len(centres) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(centres) - 1)
    weight = (position - low).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = n
    weight = weight.reshape(shape)
    return np.take(sampled, low, axis=axis) * (1 - weight) + np.take(sampled, high, axis=axis) * weight


def acquire(rng: np.random.Generator, images: dict[str, np.ndarray], brain: np.ndarray, white: np.ndarray,
            scale: float) -> dict[str, np.ndarray]:
    """Blur, bias, Rician noise, thick slices for 2D sequences, intensity scale and stored dtype."""
    shape = brain.shape
    shared = polynomial_field(rng, shape)
    two_d = rng.random() < 0.33
    slice_axis = int(rng.choice(3, p=[0.7, 0.15, 0.15]))
    slice_mm = rng.uniform(2.5, 6) * scale
    dtype = np.int16 if rng.random() < 0.7 else np.float32
    out = {}
    for name, image in images.items():
        image = ndimage.gaussian_filter(image.astype(np.float32), rng.uniform(0.4, 1.0) * scale)
        if two_d and name in ("flair", "t2"):
            image = thick_slices(image, slice_axis, slice_mm)
        log_field = shared + 0.4 * polynomial_field(rng, shape)
        log_field = (log_field - log_field[brain].mean()) / max(float(log_field[brain].std()), 1e-6)
        image = image * np.exp(rng.uniform(0.04, 0.22) * log_field)
        reference = float(np.median(image[white]))
        sigma = reference / rng.uniform(12, 50)
        image = np.hypot(image + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape)).astype(np.float32)
        image *= rng.uniform(100, 4000) / reference
        image[~brain] = 0
        if dtype is np.int16:
            image = np.round(np.clip(image, 0, 32767))
        out[name] = image.astype(dtype)
    return out


def make_case(seed: int, index: int, size=FULL_SIZE) -> Case:
    rng = np.random.default_rng([seed, index, 2021])
    shape = (size[2], size[1], size[0])
    scale = min(s / f for s, f in zip(size, FULL_SIZE))
    tissue, depth = anatomy(rng, shape, scale)
    labels = tumour(rng, tissue, depth, scale)
    t1, t2, pd, t1c, t1_csf = relaxation_maps(rng, tissue, labels, scale)
    brain = tissue != BG
    white = (tissue == WM) & (labels == 0)
    images = acquire(rng, signals(rng, t1, t2, pd, t1c, t1_csf), brain, white, scale)
    return Case(f"BraTS2021_{seed:02d}{index:03d}", images, labels)


def write_case(case: Case, out_dir: Path) -> Path:
    import SimpleITK as sitk

    folder = Path(out_dir) / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {SEQUENCE_FILES[name]: image for name, image in case.images.items()}
    arrays["seg"] = case.labels
    for token, array in arrays.items():
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 1.0))
        image.SetOrigin(ORIGIN)
        image.SetDirection(DIRECTION)
        sitk.WriteImage(image, str(folder / f"{case.case_id}_{token}.nii.gz"), True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder that receives one folder per case")
    parser.add_argument("--n", type=int, default=12, help="number of cases (default 12)")
    parser.add_argument("--seed", type=int, default=1, help="series seed, 0-99 (the case IDs carry it)")
    parser.add_argument("--start", type=int, default=0, help="index of the first case (default 0)")
    parser.add_argument("--size", default="240,240,155", help="x,y,z voxels (default BraTS's 240,240,155)")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split(","))
    if len(size) != 3 or min(size) < 48:
        parser.error(f"--size must be three integers >= 48, got {args.size}")
    if not 0 <= args.seed <= 99 or args.n < 1 or args.start < 0:
        parser.error("--seed must be 0-99, --n at least 1 and --start at least 0")
    for index in range(args.start, args.start + args.n):
        folder = write_case(make_case(args.seed, index, size), args.out)
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
