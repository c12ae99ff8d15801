"""Tile grids over a cropped case: which network input windows run, and which part of each output is kept.

Two tilings. PAPER is the authors' 16x32x32 tiles keeping their 11x12x12 centres, one grid: the reference.
FAST lays as few large tiles as cover the brain and gives each fold of the ensemble its own grid, shifted
by a few voxels, so the folds average the network's dependence on position modulo 8 (docs/ALGORITHM.md,
Inference). Planning is pure arithmetic on shapes; nothing here touches images.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .options import Tiling
from .preprocess import bounding_box

# Every spatial size must be divisible by 8 (three 2x poolings).
DIVISOR = 8
PAPER_TILE = (16, 32, 32)
PAPER_KEEP = (5, 20, 20)
# Fast tiling's default: 24x48x48 tiles that discard 2 voxels at each side where tiles meet, instead of the
# paper's 11x12x12 (1.43x redundancy instead of 8.19x); docs/SPEED.md has the measured agreement and
# speed. Much larger tiles (a whole brain) are faster still, but networks trained on 16x32x32 patches change
# their answers with that much more context; `--tile` and `--tile-margin` choose.
FAST_TILE = (24, 48, 48)
FAST_MARGIN = 2


def poolable(shape: Sequence[int]) -> bool:
    """Whether the network can run on a block of ``shape``: every side a positive multiple of `DIVISOR`."""
    return all(side >= DIVISOR and side % DIVISOR == 0 for side in shape)


@dataclass(frozen=True)
class Tile:
    """A network input window and the part of its output that is kept.

    ``source`` is in volume coordinates and may reach outside the volume, where the input is zero (the
    background value after normalisation); ``keep`` is in volume coordinates, ``keep_in_tile`` is the same
    voxels relative to the tile.
    """

    source: tuple[slice, ...]
    keep: tuple[slice, ...]
    keep_in_tile: tuple[slice, ...]


def _axis_windows(length: int, tile: int, keep: int, shift: int = 0) -> list[tuple[int, int, int]]:
    """(tile_start, keep_start, keep_stop) along one axis: kept windows of ``keep`` voxels laid from
    ``-shift`` on, clipped to [0, length), which they cover."""
    margin = (tile - keep) // 2
    windows = []
    start = -shift
    while True:
        keep_stop = min(start + keep, length)
        windows.append((start - margin, max(start, 0), keep_stop))
        if keep_stop >= length:
            return windows
        start += keep


def plan_tiles(shape: Sequence[int], tile: Sequence[int], keep: Sequence[int],
               shift: Sequence[int] = (0, 0, 0)) -> list[Tile]:
    """Tiles of size ``tile`` whose centred ``keep`` windows partition a volume of ``shape``.

    The grid of kept windows starts ``shift`` voxels before the volume (0 = at its first voxel). An odd
    margin (the paper's 16 -> 5) puts the extra voxel after the kept window.
    """
    if not poolable(tile) or any(k < 1 or k > t for t, k in zip(tile, keep)):
        raise ValueError(f"tile {tuple(tile)} / keep {tuple(keep)}: tiles must be multiples of {DIVISOR} "
                         "and hold their kept centre")
    if any(s < 0 or s >= k for s, k in zip(shift, keep)):
        raise ValueError(f"grid shift {tuple(shift)} must lie in [0, keep {tuple(keep)})")
    per_axis = [_axis_windows(n, t, k, s) for n, t, k, s in zip(shape, tile, keep, shift)]
    tiles = []
    for combo in itertools.product(*per_axis):
        source = tuple(slice(s, s + t) for (s, _, _), t in zip(combo, tile))
        keep_out = tuple(slice(a, b) for _, a, b in combo)
        keep_in = tuple(slice(a - s, b - s) for s, a, b in combo)
        tiles.append(Tile(source, keep_out, keep_in))
    return tiles


def fast_tiles(shape: Sequence[int], max_tile: Sequence[int], margin: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tile and keep sizes for the fast tiling: as few large tiles as cover the crop.

    Where one tile spans an axis it needs no discarded margin: beyond the crop lies background, which the
    zero padding reproduces exactly. Where several tiles split an axis, each discards ``margin`` voxels at
    its sides so every kept voxel sees at least that much real context across tile seams.
    """
    tile, keep = [], []
    for n, t_max in zip(shape, max_tile):
        if _round_up(n, DIVISOR) <= t_max:
            tile.append(_round_up(n, DIVISOR))
            keep.append(n)
            continue
        count = -(-n // (t_max - 2 * margin))
        k = -(-n // count)
        t = _round_up(k + 2 * margin, DIVISOR)
        tile.append(t)
        keep.append(t - 2 * margin)
    return tuple(tile), tuple(keep)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def offset_window(window: tuple[slice, ...], by: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(w.start + b, w.stop + b) for w, b in zip(window, by))


@dataclass(frozen=True)
class TilePlanner:
    """The tile grids of an ensemble: which tiles the k-th fold model runs on over a crop."""

    tiling: Tiling = Tiling.FAST
    max_tile: tuple[int, int, int] = FAST_TILE
    margin: int = FAST_MARGIN
    shift_folds: bool = True

    def __post_init__(self):
        if not poolable(self.max_tile):
            raise ValueError(f"max_tile {tuple(self.max_tile)} must be positive multiples of {DIVISOR}")
        if self.margin < 0 or any(t <= 2 * self.margin for t in self.max_tile):
            raise ValueError(f"margin {self.margin} must be >= 0 and leave part of each tile")

    def grid_shift(self, fold_index: int) -> tuple[int, int, int]:
        """Where the ``fold_index``-th model's tile grid starts, in voxels before the crop, along each axis.

        The three 2x poolings make a tile's output depend on each voxel's position modulo 8 in the tile.
        In the fast tiling, fold k's grid starts k mod 8 voxels earlier than fold 0's, so the ensemble
        averages that dependence out instead of repeating one phase ten times. A shifted grid costs an
        extra row of tiles only where the brain box leaves less than the shift spare in the last row. The
        paper tiling is the reference and keeps one grid.
        """
        if self.tiling is Tiling.PAPER or not self.shift_folds:
            return (0, 0, 0)
        return (fold_index % DIVISOR,) * 3

    def plan(self, shape: Sequence[int], fold_index: int = 0, region: tuple[slice, ...] | None = None) -> list[Tile]:
        """The tiles the ``fold_index``-th model runs on over a crop of ``shape``; their kept windows cover
        ``region`` of the crop (default: all of it), and they read whatever lies around it as context."""
        region = tuple(slice(0, n) for n in shape) if region is None else region
        inner = [r.stop - r.start for r in region]
        shift = self.grid_shift(fold_index)
        if self.tiling is Tiling.PAPER:
            tile, keep = PAPER_TILE, PAPER_KEEP
        else:
            tile, keep = fast_tiles([n + s for n, s in zip(inner, shift)], self.max_tile, self.margin)
            shift = tuple(s % k for s, k in zip(shift, keep))  # tiny kept windows (8-voxel tiles) wrap
        starts = [r.start for r in region]
        return [Tile(offset_window(t.source, starts), offset_window(t.keep, starts), t.keep_in_tile)
                for t in plan_tiles(inner, tile, keep, shift)]

    def segmented_region(self, brain: np.ndarray) -> tuple[slice, ...] | None:
        """What the kept windows must cover in a crop whose brain mask is ``brain``: the fast tiling covers
        the brain's bounding box and reads the background ring around it (the crop margin) as context
        only, since labels outside the brain are background anyway. Covering 8 fewer voxels per axis also
        lets the shifted fold grids fit without an extra row of tiles. The paper tiling, the reference,
        covers the whole crop. None = the whole crop."""
        if self.tiling is Tiling.PAPER or not brain.any():
            return None
        return bounding_box(brain)
