"""Training augmentation on a batch of patches, on the training device, every transform switchable.

Why not MONAI or TorchIO transforms: both randomise per sample in Python (one call per patch and
transform), which for the 60 small patches of a training step costs more than the step itself on a GPU and
breaks the 25% budget on a CPU (`benchmarks/train_benchmark.py` measures both). Here each transform draws
its parameters for the whole batch at once and runs as a handful of tensor operations, on the device the
network trains on. The transforms are the ones nnU-Net and TorchIO apply to brain MRI, plus a smooth
multiplicative bias field and thick-slice simulation (clinical 2D FLAIR/T2 are often acquired with 3-6 mm
slices).

Intensity transforms act on "raw-like" intensities: the normalised patch plus the case's brain
mean/std (``offset``), so that multiplicative effects (bias, gamma, scaling) behave as they do on scanner
intensities, then the offset is taken off again. Background (exactly 0 after normalisation) stays 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .conventions import EDEMA, ENHANCING, NECROSIS
from .options import AugmentLevel, parse_option


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (per patch) and ranges of each transform; probability 0 switches one off."""

    flip: float = 0.5  # per axis
    affine: float = 0.3
    rotate_degrees: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    gamma: float = 0.3  # per channel
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast: float = 0.3  # per channel: multiply by a factor (brightness / contrast of that modality)
    contrast_range: tuple[float, float] = (0.75, 1.25)
    bias: float = 0.3  # per channel: smooth multiplicative field
    bias_strength: float = 0.2  # std of the log field: about +-40% at two std
    noise: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.1)  # fraction of the raw-like intensity scale (z units)
    blur: float = 0.2  # per channel
    blur_sigma: tuple[float, float] = (0.5, 1.2)
    thick_slices: float = 0.15  # per channel: low resolution along one random axis
    thick_factor: tuple[int, int] = (2, 4)
    # Per patch: blur and thick slices hit all channels alike (one sigma, one axis), as when a whole
    # examination is acquired at low resolution; the per-channel draws above rarely pick all four at once.
    acquisition: float = 0.0
    # Per channel: each tumour sub-region (NCR, edema, ET) brightened or darkened by its own factor, so that
    # the network cannot lean on one edema-to-grey-matter ratio of our generator (scanners and sequences
    # differ there); the factor map is smoothed over 3 voxels so that no edge marks the label boundary.
    tumour_contrast: float = 0.0
    tumour_contrast_range: tuple[float, float] = (0.85, 1.2)

    @classmethod
    def for_level(cls, level: str | AugmentLevel, acquisition: float = 0.0,
                  tumour_contrast: float = 0.0) -> AugmentConfig | None:
        """The configuration of an augmentation level; ``acquisition`` sets the whole-examination
        blur / thick-slice probability and ``tumour_contrast`` the per-sub-region contrast probability
        (both 0 for the levels as they were first shipped)."""
        for name, value in (("acquisition", acquisition), ("tumour_contrast", tumour_contrast)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        level = parse_option(AugmentLevel, level, "augment")
        if level is AugmentLevel.NONE:
            return None
        extra = {"acquisition": acquisition, "tumour_contrast": tumour_contrast}
        if level is AugmentLevel.DEFAULT:
            return replace(cls(), **extra)
        return replace(cls(), **extra, affine=0.5, rotate_degrees=25.0, scale=(0.75, 1.3),
                       gamma=0.5, gamma_range=(0.5, 2.0), contrast=0.5, contrast_range=(0.6, 1.4), bias=0.5,
                       bias_strength=0.3, noise=0.4, noise_std=(0.0, 0.2), blur=0.3, blur_sigma=(0.5, 1.8),
                       thick_slices=0.3, thick_factor=(2, 6))


def augment_batch(x: torch.Tensor, y: torch.Tensor, offset: torch.Tensor, cfg: AugmentConfig,
                  generator: torch.Generator | None = None,
                  host_rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented copies of patches ``x`` (B, C, D, H, W, normalised) and labels ``y`` (B, D, H, W).

    ``offset`` (B, C) is each patch's case brain mean / std per channel (see the module docstring).
    ``generator`` (on x's device) draws the per-patch parameters; ``host_rng`` the few choices the host
    must know (which axis has thick slices), so that on a GPU no step waits for the device.
    """
    if x.ndim != 5 or y.shape != (x.shape[0], *x.shape[2:]) or offset.shape != x.shape[:2]:
        raise ValueError(f"expected x (B,C,D,H,W), y (B,D,H,W), offset (B,C); got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(offset.shape)}")
    x = x.float()
    draw = _Draw(x.shape[0], x.shape[1], x.device, generator, host_rng)
    x, y = _spatial(x, y, cfg, draw)
    background = x == 0
    raw = x + offset[:, :, None, None, None]
    raw = _intensity(raw, y, cfg, draw)
    x = (raw - offset[:, :, None, None, None]).masked_fill(background, 0.0)
    return x.contiguous(memory_format=torch.channels_last_3d), y


class _Draw:
    """Random numbers for a batch, from one generator (reproducible runs)."""

    def __init__(self, batch: int, channels: int, device: torch.device, generator: torch.Generator | None,
                 host_rng: np.random.Generator | None):
        self.batch, self.channels, self.device, self.generator = batch, channels, device, generator
        # On a CPU, skipping unchosen patches saves work; on a GPU, asking whether any patch was chosen
        # would make the host wait for the device every step, so every transform runs and is blended.
        self.lazy = device.type == "cpu"
        self.host = host_rng if host_rng is not None else np.random.default_rng()

    def uniform(self, shape, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, device=self.device, generator=self.generator)

    def chosen(self, probability: float, per_channel: bool = False) -> torch.Tensor:
        shape = (self.batch, self.channels) if per_channel else (self.batch,)
        return torch.rand(shape, device=self.device, generator=self.generator) < probability

    def normal(self, shape) -> torch.Tensor:
        return torch.randn(shape, device=self.device, generator=self.generator)

    def host_choice(self, n: int) -> int:
        """An integer in [0, n) that the host knows without waiting for the device."""
        return int(self.host.integers(n))


# ---------------------------------------------------------------------------------------------- spatial


def _spatial(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, draw: _Draw):
    for axis in range(3):
        if cfg.flip > 0:
            chosen = draw.chosen(cfg.flip)
            x = torch.where(chosen[:, None, None, None, None], x.flip(axis + 2), x)
            y = torch.where(chosen[:, None, None, None], y.flip(axis + 1), y)
    if cfg.affine > 0:
        chosen = draw.chosen(cfg.affine)
        if draw.lazy:  # CPU: transform only the chosen patches
            if chosen.any():
                idx = chosen.nonzero().flatten()
                x, y = x.clone(), y.clone()
                x[idx], y[idx] = _rotate_scale(x[idx], y[idx], cfg, draw)
        else:  # GPU: transform all and blend, so the host never waits for the device
            moved_x, moved_y = _rotate_scale(x, y, cfg, draw)
            x = torch.where(chosen[:, None, None, None, None], moved_x, x)
            y = torch.where(chosen[:, None, None, None], moved_y, y)
    return x, y


def _rotate_scale(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, draw: _Draw):
    """Small rotations about the three axes and isotropic scaling, about the patch centre, in voxel units
    (the patch is anisotropic in voxels, so the matrix is conjugated with the half-sizes)."""
    b = x.shape[0]
    angles = draw.uniform((b, 3), -1, 1) * math.radians(cfg.rotate_degrees)
    scale = draw.uniform((b,), *cfg.scale)
    rotation = _rotation_matrices(angles) / scale[:, None, None]
    size = torch.tensor(x.shape[2:][::-1], dtype=x.dtype, device=x.device)  # grid order is (W, H, D)
    half = (size - 1) / 2
    theta_linear = rotation / half[None, :, None] * half[None, None, :]
    theta = torch.cat([theta_linear, torch.zeros(b, 3, 1, device=x.device)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    labels = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=True)
    return x, labels[:, 0].round().to(y.dtype)


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def matrix(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = matrix([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    ry = matrix([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    rz = matrix([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


# -------------------------------------------------------------------------------------------- intensity


def _intensity(raw: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, draw: _Draw) -> torch.Tensor:
    b, c = raw.shape[:2]
    if cfg.tumour_contrast > 0:  # first: a property of the tissue, before the scanner's effects
        raw = _where_channels(draw.chosen(cfg.tumour_contrast, True), raw * _tumour_factors(y, c, cfg, draw), raw)
    if cfg.bias > 0:
        raw = _where_channels(draw.chosen(cfg.bias, True), raw * _bias_field(raw.shape, cfg, draw), raw)
    if cfg.contrast > 0:
        factor = draw.uniform((b, c), *cfg.contrast_range)
        raw = _where_channels(draw.chosen(cfg.contrast, True), raw * factor[:, :, None, None, None], raw)
    if cfg.gamma > 0:
        raw = _where_channels(draw.chosen(cfg.gamma, True), _gamma(raw, cfg, draw), raw)
    if cfg.blur > 0 or cfg.acquisition > 0:
        chosen, whole = draw.chosen(cfg.blur, True), _whole_examination(cfg, draw)
        chosen = chosen | whole[:, None]
        if not draw.lazy or chosen.any():
            sigma = draw.uniform((b, c), *cfg.blur_sigma)
            if cfg.acquisition > 0:  # one sigma for the whole examination (no extra draws otherwise)
                sigma = torch.where(whole[:, None], sigma[:, :1], sigma)
            raw = _where_channels(chosen, _blur(raw, sigma, radius=max(1, math.ceil(2 * cfg.blur_sigma[1]))), raw)
    if cfg.thick_slices > 0 or cfg.acquisition > 0:
        chosen = draw.chosen(cfg.thick_slices, True) | _whole_examination(cfg, draw)[:, None]
        if not draw.lazy or chosen.any():
            raw = _where_channels(chosen, _thick_slices(raw, cfg, draw), raw)
    if cfg.noise > 0:
        std = draw.uniform((b, 1), *cfg.noise_std) * draw.chosen(cfg.noise)[:, None]
        raw = raw + std[:, :, None, None, None] * draw.normal(raw.shape)
    return raw


def _whole_examination(cfg: AugmentConfig, draw: _Draw) -> torch.Tensor:
    """Per patch: whether a transform hits every channel; draws nothing when switched off, so runs
    without it draw exactly what they drew before it existed."""
    if cfg.acquisition <= 0:
        return torch.zeros(draw.batch, dtype=torch.bool, device=draw.device)
    return draw.chosen(cfg.acquisition)


def _tumour_factors(y: torch.Tensor, channels: int, cfg: AugmentConfig, draw: _Draw) -> torch.Tensor:
    """(B, C, D, H, W) multiplicative map: 1 outside the tumour, a log-uniform factor per patch, channel
    and sub-region inside it, averaged over 3x3x3 voxels (partial volume at the boundary)."""
    lo, hi = (math.log(v) for v in cfg.tumour_contrast_range)
    log_factor = torch.zeros((y.shape[0], channels, *y.shape[1:]), device=y.device)
    for region in (NECROSIS, EDEMA, ENHANCING):
        inside = (y == region)[:, None].float()
        log_factor = log_factor + inside * draw.uniform((y.shape[0], channels), lo, hi)[:, :, None, None, None]
    return torch.exp(F.avg_pool3d(log_factor, 3, stride=1, padding=1, count_include_pad=False))


def _where_channels(chosen: torch.Tensor, changed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    return torch.where(chosen[:, :, None, None, None], changed, original)


def _bias_field(shape, cfg: AugmentConfig, draw: _Draw) -> torch.Tensor:
    """exp of a smooth field: random values on a 3x4x4 grid, trilinearly upsampled to the patch."""
    b, c = shape[:2]
    coarse = draw.normal((b, c, 3, 4, 4)) * cfg.bias_strength
    return torch.exp(F.interpolate(coarse, size=shape[2:], mode="trilinear", align_corners=True))


def _gamma(raw: torch.Tensor, cfg: AugmentConfig, draw: _Draw) -> torch.Tensor:
    """Gamma on each channel's intensities scaled to [0, 1] over the patch, then scaled back."""
    b, c = raw.shape[:2]
    flat = raw.flatten(2)
    low, high = flat.amin(2)[:, :, None, None, None], flat.amax(2)[:, :, None, None, None]
    span = (high - low).clamp_min(1e-6)
    # log-uniform so that gamma < 1 and > 1 are equally likely in ratio terms
    lo, hi = (math.log(v) for v in cfg.gamma_range)
    gamma = torch.exp(draw.uniform((b, c), lo, hi))[:, :, None, None, None]
    return ((raw - low) / span).clamp(0, 1).pow(gamma) * span + low


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    kernels = torch.exp(-0.5 * (taps[None] / sigma.flatten()[:, None]) ** 2)
    return kernels / kernels.sum(1, keepdim=True)


def _blur(raw: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per (patch, channel), taps out to ``radius``: one grouped
    convolution per axis."""
    b, c = raw.shape[:2]
    kernels = _gaussian_kernels(sigma, radius)  # (b*c, taps)
    out = raw.reshape(1, b * c, *raw.shape[2:])
    for axis in range(3):
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        out = F.conv3d(F.pad(out, _pad_for(axis, radius), mode="replicate"), kernels.reshape(shape), groups=b * c)
    return out.reshape(raw.shape)


def _pad_for(axis: int, radius: int) -> list[int]:
    pad = [0] * 6  # F.pad order: W, H, D
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
    return pad


def _thick_slices(raw: torch.Tensor, cfg: AugmentConfig, draw: _Draw) -> torch.Tensor:
    """Low resolution along one axis (the same axis and factor for the whole batch, drawn per call):
    average over slabs of ``factor`` slices, then interpolate back linearly."""
    low_factor, high_factor = cfg.thick_factor
    axis, factor = draw.host_choice(3), low_factor + draw.host_choice(high_factor - low_factor + 1)
    size = list(raw.shape[2:])
    kernel = [1, 1, 1]
    kernel[axis] = factor
    low = F.avg_pool3d(raw, kernel_size=kernel, stride=kernel, ceil_mode=True)
    return F.interpolate(low, size=size, mode="trilinear", align_corners=False)
