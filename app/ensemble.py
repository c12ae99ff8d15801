"""A model-agnostic tiled ensemble runner: every model runs once per tile of its grid, and each of its
outputs is accumulated over the kept windows and averaged over the models.

What a model's outputs mean is not known here: ``reduce`` turns a batch of tiles into a tuple of per-voxel
outputs, each shaped (B, [C,] d, h, w) (for OM-Net, `app.fusion.omnet_probabilities`). Test-time mirroring
and the out-of-memory retry live here so that no model-specific loop has to repeat them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .tiling import Tile, offset_window

log = logging.getLogger(__name__)

Reduce = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]]
Progress = Callable[[int, int], None]

# The eight mirror images of a volume: subsets of the spatial axes (2, 3, 4 of a (B, C, D, H, W) batch).
MIRRORS = ((), (4,), (3,), (3, 4), (2,), (2, 4), (2, 3), (2, 3, 4))


class DeviceOutOfMemory(RuntimeError):
    """Even a single tile did not fit in the device's memory."""


class TiledEnsemble:
    """Runs ``models`` over the tiles ``plans[k]`` of one normalised crop and averages their outputs.

    ``batch_voxels`` is the input voxels per forward pass. On a CUDA out-of-memory error the batch is
    halved and the group retried; the halved size is kept for later calls (the next case will not fit
    either). When a single tile does not fit, `DeviceOutOfMemory` is raised.
    """

    def __init__(self, reduce: Reduce, batch_voxels: int, max_batch: int = 64):
        if batch_voxels < 1 or max_batch < 1:
            raise ValueError(f"batch_voxels {batch_voxels} and max_batch {max_batch} must be positive")
        self.reduce, self.batch_voxels, self.max_batch = reduce, batch_voxels, max_batch

    def run(self, models: Sequence[nn.Module], image: torch.Tensor, plans: Sequence[Sequence[Tile]],
            mirrors: Sequence[Sequence[tuple[int, ...]]], progress: Progress | None = None) -> list[torch.Tensor]:
        """The outputs of ``reduce`` averaged over models (and mirrors) on ``image`` (C, D, H, W), a tensor
        on the models' device; voxels no kept window covers stay 0."""
        if not (len(models) == len(plans) == len(mirrors)) or not models:
            raise ValueError(f"need one plan and one mirror set per model, got {len(models)} models, "
                             f"{len(plans)} plans, {len(mirrors)} mirror sets")
        shape = tuple(image.shape[1:])
        # One zero-padded copy of the crop on the device serves every model's tiles.
        before = [max(0, -min(t.source[a].start for p in plans for t in p)) for a in range(3)]
        after = [max(0, max(t.source[a].stop for p in plans for t in p) - n) for a, n in enumerate(shape)]
        pad = [amount for a in reversed(range(3)) for amount in (before[a], after[a])]
        padded = torch.nn.functional.pad(image, pad)
        sums: list[torch.Tensor] | None = None
        done, total = 0, sum(len(p) for p in plans)
        for model, tiles, flips in zip(models, plans, mirrors):
            start = 0
            while start < len(tiles):
                group = tiles[start:start + self._batch(tiles[0])]
                x = torch.stack([padded[(slice(None), *offset_window(t.source, before))] for t in group])
                try:
                    outputs = self._mirrored(model, x, flips)
                except torch.OutOfMemoryError:
                    self._halve(len(group))
                    continue
                if sums is None:
                    sums = [torch.zeros((*o.shape[1:-3], *shape), device=o.device) for o in outputs]
                for total_, output in zip(sums, outputs):
                    for i, t in enumerate(group):
                        total_[(..., *t.keep)] += output[i][(..., *t.keep_in_tile)]
                start += len(group)
                done += len(group)
                if progress is not None:
                    progress(done, total)
        assert sums is not None
        for s in sums:  # in place: a copy of every output would double this stage's peak memory
            s /= len(models)
        return sums

    def _batch(self, tile: Tile) -> int:
        tile_voxels = int(np.prod([s.stop - s.start for s in tile.source]))
        return max(1, min(self.max_batch, self.batch_voxels // tile_voxels))

    def _halve(self, failed_batch: int) -> None:
        if failed_batch <= 1:
            raise DeviceOutOfMemory("out of device memory with a single tile")
        torch.cuda.empty_cache()
        self.max_batch = max(1, failed_batch // 2)
        log.warning("device out of memory with %d tiles per pass: retrying with %d", failed_batch, self.max_batch)

    def _mirrored(self, model: nn.Module, x: torch.Tensor, mirrors: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """``reduce`` averaged over the mirror images ``mirrors`` of the tiles, each output flipped back."""
        outputs: list[torch.Tensor] | None = None
        for axes in mirrors:
            flipped = x.flip(axes) if axes else x
            current = list(self.reduce(model, flipped.contiguous(memory_format=torch.channels_last_3d)))
            if axes:  # the spatial axes are the last three of every output, whatever comes before them
                current = [o.flip([a - x.ndim for a in axes]) for o in current]
            outputs = current if outputs is None else [o + c for o, c in zip(outputs, current)]
        assert outputs is not None
        return outputs if len(mirrors) == 1 else [o / len(mirrors) for o in outputs]
