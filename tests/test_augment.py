from dataclasses import replace

import numpy as np
import pytest
import torch

from app.augment import AugmentConfig, augment_batch

OFF = replace(AugmentConfig(), flip=0.0, affine=0.0, gamma=0.0, contrast=0.0, bias=0.0, noise=0.0, blur=0.0,
              thick_slices=0.0)


def _batch(seed: int = 0, b: int = 6):
    """Patches whose every channel is a smooth function of the label map (plus an offset), background rim
    of zeros, so spatial changes of images and labels can be compared."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(1, 5, (b, 4, 8, 8), generator=g)
    y = y.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    x = y[:, None].float().repeat(1, 4, 1, 1, 1) * torch.tensor([1.0, 0.5, -0.5, 2.0])[None, :, None, None, None]
    x[:, :, :2] = 0
    y[:, :2] = 0
    return x, y, torch.full((b, 4), 3.0)


def test_everything_switched_off_is_the_identity():
    x, y, offset = _batch()
    xa, ya = augment_batch(x, y, offset, OFF, torch.Generator().manual_seed(0), np.random.default_rng(0))
    torch.testing.assert_close(xa, x)
    assert torch.equal(ya, y)


def test_flips_and_rotations_move_images_and_labels_together():
    x, y, offset = _batch(1)
    flips = replace(OFF, flip=1.0)  # every patch flipped on all three axes
    xa, ya = augment_batch(x, y, offset, flips, torch.Generator().manual_seed(0))
    assert torch.equal(ya, y.flip(1, 2, 3))
    torch.testing.assert_close(xa, x.flip(2, 3, 4))
    rotate = replace(OFF, affine=1.0, rotate_degrees=20.0, scale=(0.9, 1.1))
    xa, ya = augment_batch(x, y, offset, rotate, torch.Generator().manual_seed(1))
    assert not torch.equal(ya, y)
    # channel 0 is the label value: after the move it matches the moved labels (up to interpolation at
    # block edges), far better than the labels left where they were
    moved = (xa[:, 0].round() == ya.float()).float().mean()
    unmoved = (xa[:, 0].round() == y.float()).float().mean()
    assert moved > 0.8 and moved > unmoved + 0.2, (float(moved), float(unmoved))


def test_intensity_transforms_keep_the_background_zero_and_change_the_brain():
    x, y, offset = _batch(2)
    intensity = replace(AugmentConfig.for_level("strong"), flip=0.0, affine=0.0)
    xa, ya = augment_batch(x, y, offset, intensity, torch.Generator().manual_seed(3), np.random.default_rng(3))
    assert torch.equal(ya, y)
    assert (xa[x == 0] == 0).all()
    assert not torch.allclose(xa[x != 0], x[x != 0])
    assert torch.isfinite(xa).all()


def test_each_transform_alone_runs_and_is_reproducible():
    x, y, offset = _batch(4)
    for name in ("flip", "affine", "gamma", "contrast", "bias", "noise", "blur", "thick_slices", "tumour_contrast"):
        cfg = replace(OFF, **{name: 1.0})
        runs = [augment_batch(x, y, offset, cfg, torch.Generator().manual_seed(5), np.random.default_rng(5))
                for _ in range(2)]
        torch.testing.assert_close(runs[0][0], runs[1][0])
        assert not torch.allclose(runs[0][0], x), name


def test_levels_are_validated():
    assert AugmentConfig.for_level("none") is None
    assert AugmentConfig.for_level("strong").bias_strength > AugmentConfig.for_level("default").bias_strength
    with pytest.raises(ValueError, match="augment must be one of"):
        AugmentConfig.for_level("heavy")


def test_whole_examination_blur_and_thick_slices_hit_every_channel_alike():
    # The channels are scaled copies of one map and both transforms are linear: applied alike (one sigma,
    # one axis), the scaled-back channels stay equal; drawn per channel, the sigmas differ.
    x, y, offset = _batch(6)
    scales = torch.tensor([1.0, 0.5, -0.5, 2.0])[None, :, None, None, None]
    whole = replace(OFF, acquisition=1.0)
    xa, _ = augment_batch(x, y, offset, whole, torch.Generator().manual_seed(7), np.random.default_rng(7))
    unscaled = xa / scales
    assert not torch.allclose(xa, x)
    for c in range(1, 4):
        torch.testing.assert_close(unscaled[:, c], unscaled[:, 0], rtol=1e-4, atol=1e-4)
    per_channel = replace(OFF, blur=1.0)
    xa, _ = augment_batch(x, y, offset, per_channel, torch.Generator().manual_seed(7), np.random.default_rng(7))
    assert not torch.allclose((xa / scales)[:, 1], (xa / scales)[:, 0], rtol=1e-3, atol=1e-3)


def test_whole_examination_probability_is_validated():
    assert AugmentConfig.for_level("strong", acquisition=0.2).acquisition == 0.2
    assert AugmentConfig.for_level("default").acquisition == 0.0
    with pytest.raises(ValueError, match="acquisition must be a probability"):
        AugmentConfig.for_level("default", acquisition=1.5)
    assert AugmentConfig.for_level("default", tumour_contrast=0.3).tumour_contrast == 0.3
    with pytest.raises(ValueError, match="tumour_contrast must be a probability"):
        AugmentConfig.for_level("default", tumour_contrast=-0.1)


def test_tumour_contrast_changes_each_sub_region_on_its_own_and_leaves_the_brain():
    y = torch.full((4, 16, 16, 16), 4)  # normal brain
    y[:, 4:8, 4:12, 4:12], y[:, 9:13, 4:12, 4:12] = 2, 3  # an edema slab and an ET slab
    x = torch.ones((4, 4, 16, 16, 16))
    offset = torch.zeros((4, 4))
    cfg = replace(OFF, tumour_contrast=1.0)
    xa, ya = augment_batch(x, y, offset, cfg, torch.Generator().manual_seed(3), np.random.default_rng(3))
    assert torch.equal(ya, y)
    torch.testing.assert_close(xa[:, :, :, 14:], x[:, :, :, 14:])  # brain two voxels from the tumour
    edema, enhancing = xa[:, :, 5:7, 6:10, 6:10], xa[:, :, 10:12, 6:10, 6:10]
    for region in (edema, enhancing):  # one factor per patch and channel, inside the drawn range
        flat = region.flatten(2)
        torch.testing.assert_close(flat, flat[:, :, :1].expand_as(flat))
        assert flat.min() >= 0.85 - 1e-5 and flat.max() <= 1.2 + 1e-5
    assert not torch.allclose(edema[:, :, 0, 0, 0], enhancing[:, :, 0, 0, 0])
    boundary = xa[:, :, 3, 6:10, 6:10]  # half a voxel of partial volume: between brain and edema
    inner = edema[:, :, 0, :1, :1]
    assert torch.all((boundary - 1).abs() < (inner - 1).abs()) and torch.all((boundary - 1) * (inner - 1) > 0)
