from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from app.conventions import MODALITY_ORDER, Modality
from app.ensemble import MIRRORS
from app.fusion import (
    FusionThresholds,
    TaskProbabilities,
    dilate,
    dilate_tensor,
    fuse,
    fuse_tensors,
    fusion_region,
)
from app.inference import CasePrediction, EnsemblePredictor, scaled_input, scaled_region, scaled_shape
from app.metrics import region_dice
from app.options import MIN_ENHANCING_VOXELS, EdemaRelabel, EdemaSplit, Fusion, KeepLargest
from app.pipeline import complete_segmentation
from app.postprocess import (
    PostprocessConfig,
    drop_core_islands,
    drop_doubtful_components,
    drop_scant_enhancement,
    enhancement,
    fill_enclosed_core,
    holds_sure_component,
    postprocess,
    relabel_dark_edema,
    remove_small_components,
)
from app.tiling import fast_tiles, plan_tiles

SHAPE = (20, 30, 30)


def _probabilities(tumour, task2_class, enhancing):
    classes = np.zeros((5, *SHAPE), np.float32)
    for k in range(5):
        classes[k][task2_class == k] = 0.9
    classes += 0.02
    return TaskProbabilities(tumour.astype(np.float32), classes, enhancing.astype(np.float32))


def test_fusion_follows_the_cascade_rules():
    tumour = np.zeros(SHAPE)
    tumour[5:10, 10:20, 10:20] = 0.9  # coarse whole tumour from task 1
    task2 = np.full(SHAPE, 4)
    task2[5:10, 10:20, 10:20] = 2  # edema
    task2[6:9, 12:18, 12:18] = 1  # core
    task2[7:9, 20:22, 10:12] = 2  # edema 1-2 voxels outside task 1's mask: inside the 5-voxel dilation
    task2[0:2, 0:2, 0:2] = 2  # far away: outside the dilation, must be dropped
    enhancing = np.zeros(SHAPE)
    enhancing[6:9, 12:15, 12:18] = 0.8  # half the core is ET
    labels = fuse(_probabilities(tumour, task2, enhancing))
    assert labels[7, 13, 13] == 3 and labels[7, 16, 16] == 1
    assert labels[5, 10, 10] == 2
    assert labels[8, 21, 11] == 2
    assert labels[0:2, 0:2, 0:2].sum() == 0
    # ET only where task 2 said core: task 3's ET outside the core is ignored.
    enhancing[5, 10, 10] = 0.99
    assert fuse(_probabilities(tumour, task2, enhancing))[5, 10, 10] == 2


def test_fusion_without_coarse_tumour_gives_empty_map():
    task2 = np.full(SHAPE, 2)
    labels = fuse(_probabilities(np.zeros(SHAPE), task2, np.ones(SHAPE)))
    assert not labels.any()


def test_dilation_is_a_ball_of_radius_five():
    mask = np.zeros((21, 21, 21), bool)
    mask[10, 10, 10] = True
    grown = dilate(mask, 5)
    assert grown[10, 10, 15] and not grown[10, 10, 16]
    assert grown[13, 14, 10] and not grown[14, 14, 10]  # sqrt(9+16)=5 in, sqrt(16+16)>5 out


def test_small_spurious_component_removed_large_kept():
    labels = np.zeros((40, 60, 60), np.uint8)
    labels[5:25, 5:30, 5:30] = 2  # 12,500 voxels: Vmax, threshold min(2000, 1250) = 1250
    labels[10:15, 10:20, 10:20] = 3
    labels[30:38, 40:50, 40:50] = 1  # 800 voxels: removed
    labels[28:40, 35:60, 5:10] = 2  # 1,500 voxels: kept
    out = remove_small_components(labels)
    assert not out[30:38, 40:50, 40:50].any()
    assert (out[28:40, 35:60, 5:10] == 2).all()
    assert (out[5:25, 5:30, 5:30] == labels[5:25, 5:30, 5:30]).all()


def _edema_case(et_voxels: int):
    labels = np.zeros((30, 40, 40), np.uint8)
    labels[5:25, 5:35, 5:35] = 2  # 18,000 voxels of edema
    t1c = np.full(labels.shape, 500.0)
    t1c[5:25, 5:20, 5:35] = 100.0  # the darker half of the edema on T1c
    labels[12:12 + et_voxels, 20, 20] = 3
    return labels, t1c


def test_dark_edema_becomes_necrosis_when_et_is_scarce():
    labels, t1c = _edema_case(et_voxels=3)
    out = relabel_dark_edema(labels, t1c)
    dark = (labels == 2) & (t1c == 100.0)
    assert (out[dark] == 1).all()
    assert (out[(labels == 2) & (t1c == 500.0)] == 2).all()
    # WT and ET never change in step 2.
    assert ((out > 0) == (labels > 0)).all() and ((out == 3) == (labels == 3)).all()


def test_dark_edema_untouched_when_case_has_enough_et():
    labels, t1c = _edema_case(et_voxels=0)
    labels[5:25, 5:35, 30:35] = 3  # 3,000 of 18,000 voxels: ratio 0.17 >= 0.1
    out = relabel_dark_edema(labels, t1c)
    np.testing.assert_array_equal(out, labels)


def _spread_edema_case(dark_block: bool):
    """_edema_case's tumour whose edema T1c is spread evenly over 400-600 (no dark part), with or without
    a block of 1,800 voxels at 100 (a dark part that stands out)."""
    labels, t1c = _edema_case(et_voxels=3)
    t1c[labels == 2] = np.random.default_rng(0).uniform(400.0, 600.0, int((labels == 2).sum()))
    if dark_block:
        t1c[5:25, 5:8, 5:35] = 100.0
    return labels, t1c


def test_dark_tail_split_takes_only_edema_that_stands_out():
    labels, t1c = _spread_edema_case(dark_block=False)
    edema = int((labels == 2).sum())
    halved = relabel_dark_edema(labels, t1c, split=EdemaSplit.K_MEANS)
    assert 0.4 < (halved == 1).sum() / edema < 0.6  # K-means splits even a spread without a dark part
    np.testing.assert_array_equal(relabel_dark_edema(labels, t1c, split="dark-tail"), labels)
    labels, t1c = _spread_edema_case(dark_block=True)
    out = relabel_dark_edema(labels, t1c, split="dark-tail")
    np.testing.assert_array_equal(out == 1, (labels == 1) | ((labels == 2) & (t1c == 100.0)))
    assert ((out > 0) == (labels > 0)).all() and ((out == 3) == (labels == 3)).all()
    with pytest.raises(ValueError, match="split must be one of"):
        relabel_dark_edema(labels, t1c, split="median")


def test_postprocess_config_picks_step2s_split():
    labels, t1c = _spread_edema_case(dark_block=True)
    step_2_alone = dict(remove_small_components=False, min_enhancing_voxels=0, fill_enclosed_core=False,
                        drop_doubtful_components=False, min_island_voxels=0)
    for split in EdemaSplit:
        out = postprocess(labels, t1c, PostprocessConfig(edema_split=split.value, **step_2_alone))
        np.testing.assert_array_equal(out, relabel_dark_edema(labels, t1c, split=split))
    assert PostprocessConfig().edema_split is EdemaSplit.K_MEANS
    with pytest.raises(ValueError, match="edema_split must be one of"):
        PostprocessConfig(edema_split="median")


@pytest.mark.parametrize("mode, relabelled", [("non-enhancing", False), ("paper", True), ("off", False)])
def test_step2_by_default_leaves_a_tumour_that_enhances(mode, relabelled):
    # 729 ET voxels in one block of an 18,000-voxel tumour: little ET by the paper's rule (ratio 0.04, under
    # 1,000 voxels), yet an enhancing tumour (its largest ET component has >= 300 voxels).
    labels, t1c = _edema_case(et_voxels=0)
    labels[5:14, 20:29, 20:29] = 3
    config = PostprocessConfig(remove_small_components=False, edema_relabel=mode, min_enhancing_voxels=0,
                               fill_enclosed_core=False, drop_doubtful_components=False)
    out = postprocess(labels, t1c, config)
    dark = (labels == 2) & (t1c == 100.0)
    assert (out[dark] == 1).all() if relabelled else (out == labels).all()


def test_step2_by_default_still_relabels_a_tumour_without_enhancement():
    labels, t1c = _edema_case(et_voxels=3)  # 3 ET voxels: no enhancing tumour
    config = PostprocessConfig(remove_small_components=False, min_enhancing_voxels=0, fill_enclosed_core=False,
                               drop_doubtful_components=False)
    assert config.edema_relabel is EdemaRelabel.NON_ENHANCING
    out = postprocess(labels, t1c, config)
    np.testing.assert_array_equal(out, relabel_dark_edema(labels, t1c))
    assert (out == 1).any()
    with pytest.raises(ValueError, match="edema_relabel must be one of"):
        PostprocessConfig(edema_relabel="always")


def test_postprocess_steps_can_be_switched_off():
    labels, t1c = _edema_case(et_voxels=3)
    labels[0:2, 0:2, 0:2] = 2
    untouched = postprocess(labels, t1c, PostprocessConfig.off())
    np.testing.assert_array_equal(untouched, labels)
    only_step1 = postprocess(labels, t1c, PostprocessConfig(edema_relabel=EdemaRelabel.OFF, min_enhancing_voxels=0,
                                                            fill_enclosed_core=False, drop_doubtful_components=False))
    assert not only_step1[0:2, 0:2, 0:2].any() and not (only_step1 == 1).any()


def _tumour_with_enhancement(et_voxels: int) -> np.ndarray:
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:35, 5:35, 5:35] = 2
    labels[15:25, 15:25, 15:25] = 1
    labels.reshape(-1)[np.flatnonzero(labels.reshape(-1) == 1)[:et_voxels]] = 3
    return labels


def test_scant_enhancement_becomes_necrosis_and_whole_tumour_and_core_stay():
    scant = _tumour_with_enhancement(60)
    out = drop_scant_enhancement(scant, 100)
    assert not (out == 3).any() and (out == 1).sum() == (scant == 1).sum() + 60
    dice = region_dice(out, scant)
    assert dice["WT"] == 1.0 and dice["TC"] == 1.0
    enough = _tumour_with_enhancement(400)
    np.testing.assert_array_equal(drop_scant_enhancement(enough, 300), enough)
    t1c = np.ones(scant.shape, np.float32)
    assert MIN_ENHANCING_VOXELS > 60  # on by default, without the enhancement check too
    no_check = PostprocessConfig(enhancement_check_voxels=0)
    assert not (postprocess(scant, t1c, no_check, tumour_probability=_certain(scant)) == 3).any()
    assert (postprocess(scant, t1c, PostprocessConfig(min_enhancing_voxels=0), _certain(scant)) == 3).sum() == 60
    with pytest.raises(ValueError, match="min_enhancing_voxels"):
        PostprocessConfig(min_enhancing_voxels=-1)


def test_enhancement_in_specks_only_becomes_necrosis():
    """Step 3 counts the largest ET component: 400 ET voxels as four separate specks of 100 go, one rim
    of 400 stays."""
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:35, 5:35, 5:35] = 2
    labels[10:30, 10:30, 10:30] = 1
    specks = labels.copy()
    for corner in ((10, 10), (10, 25), (25, 10), (25, 25)):
        specks[15:19, corner[0]:corner[0] + 5, corner[1]:corner[1] + 5] = 3  # 4 x 5 x 5 = 100 voxels
    assert (specks == 3).sum() == 400
    out = drop_scant_enhancement(specks, 300)
    assert not (out == 3).any() and (out == 1).sum() == (specks == 1).sum() + 400
    rim = labels.copy()
    rim[15:19, 10:30, 10:15] = 3  # one component of 400
    np.testing.assert_array_equal(drop_scant_enhancement(rim, 300), rim)


def _small_rim(t1_bright: bool, block: tuple[int, int, int] = (6, 10, 10)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 27,000-voxel edema around an ET ``block`` (600 voxels by default: past step 3's floor, under the
    check's 1,000) that is bright on T1c; on T1 as bright (``t1_bright``: no contrast uptake) or as the
    edema around it. The edema's darker half on T1c is the kind of core step 2 finds."""
    shape = (40, 40, 40)
    labels = np.zeros(shape, np.uint8)
    labels[5:35, 5:35, 5:35] = 2
    labels[17:17 + block[0], 15:15 + block[1], 15:15 + block[2]] = 3
    t1c = np.full(shape, 400.0, np.float32)
    t1c[5:35, 5:35, 5:20] = 300.0
    t1c[5:35, 5:35, 20:35] = 500.0
    t1c[labels == 3] = 900.0
    t1 = t1c.copy()  # the same tissue contrast before contrast uptake ...
    if not t1_bright:
        t1[labels == 3] = 400.0  # ... but for the ET's
    return labels, t1c, t1


def test_enhancement_measures_t1c_over_t1_against_the_surroundings():
    labels, t1c, flat_t1 = _small_rim(t1_bright=False)
    _, _, bright_t1 = _small_rim(t1_bright=True)
    enhancing = labels == 3
    assert enhancement(enhancing, t1c, flat_t1) > 2.0
    assert enhancement(enhancing, t1c, bright_t1) == pytest.approx(0.0)  # as bright before contrast: no uptake
    # A brain-wide shift of either image changes nothing (each is z-scored inside the brain).
    assert enhancement(enhancing, t1c * 3 + 50, flat_t1 + 7) == pytest.approx(enhancement(enhancing, t1c, flat_t1))
    with pytest.raises(ValueError, match="at least one enhancing voxel"):
        enhancement(np.zeros_like(enhancing), t1c, flat_t1)


def test_small_et_that_does_not_enhance_becomes_necrosis_and_step2_runs():
    """Step 3's enhancement check (on by default): a 600-voxel ET as bright on T1 as on T1c goes, and the
    tumour is then treated as non-enhancing (step 2 splits its edema); one that is bright on T1c only stays,
    and so does a non-enhancing ET of the check's size or more."""
    config = PostprocessConfig(fill_enclosed_core=False, drop_doubtful_components=False)
    labels, t1c, bright_t1 = _small_rim(t1_bright=True)
    out = postprocess(labels, t1c, config, t1=bright_t1)
    assert not (out == 3).any() and (out[labels == 3] == 1).all()
    assert (out[(labels == 2) & (t1c == 300.0)] == 1).all() and (out[(labels == 2) & (t1c == 500.0)] == 2).all()
    assert ((out > 0) == (labels > 0)).all()
    _, _, flat_t1 = _small_rim(t1_bright=False)
    np.testing.assert_array_equal(postprocess(labels, t1c, config, t1=flat_t1), labels)
    np.testing.assert_array_equal(postprocess(labels, t1c, replace(config, enhancement_check_voxels=600),
                                              t1=bright_t1), labels)
    # Off: by its own knob, or with the rest of step 3; then T1 is not needed.
    np.testing.assert_array_equal(postprocess(labels, t1c, replace(config, enhancement_check_voxels=0)), labels)
    np.testing.assert_array_equal(postprocess(labels, t1c, replace(config, min_enhancing_voxels=0)), labels)
    with pytest.raises(ValueError, match="needs the T1 image"):
        postprocess(labels, t1c, config)
    with pytest.raises(ValueError, match="T1"):
        postprocess(labels, t1c, config, t1=bright_t1[:-1])
    with pytest.raises(ValueError, match="enhancement_check_voxels"):
        PostprocessConfig(enhancement_check_voxels=-1)


@pytest.mark.parametrize("mode, split", [("non-enhancing", True), ("paper", False)])
def test_et_that_step3_takes_does_not_shield_the_tumour_from_step2(mode, split):
    """A tumour whose 1,032 false ET voxels (600 + 432, neither block enhancing) fail step 3's check: by
    default step 2 counts that ET as absent and splits the edema, as it would have without the specks (the
    same tumour through the paper's tiling and the fast one once ended with cores of 6,266 and 38,988
    voxels for this reason: docs/SPEED.md); the paper's rule counts the ET as predicted, over 1,000, and
    leaves the edema. Step 3 takes the ET either way."""
    labels, t1c, t1 = _small_rim(t1_bright=True)
    second = (slice(17, 23), slice(26, 32), slice(22, 34))
    labels[second], t1c[second], t1[second] = 3, 900.0, 900.0
    assert (labels == 3).sum() == 1032
    config = PostprocessConfig(edema_relabel=mode, fill_enclosed_core=False, drop_doubtful_components=False)
    out = postprocess(labels, t1c, config, t1=t1)
    assert not (out == 3).any() and (out[labels == 3] == 1).all()
    dark_edema = (labels == 2) & (t1c == 300.0)
    assert (out[dark_edema] == 1).all() if split else (out[dark_edema] == 2).all()
    assert (out[(labels == 2) & (t1c == 500.0)] == 2).all() and ((out > 0) == (labels > 0)).all()


def test_an_enhancing_et_under_the_check_size_is_kept_down_to_the_floor():
    """With the check, the size floor can sit below where false specks reach: a 150-voxel ET that takes up
    contrast stays, the same ET as bright on T1 goes, and a 60-voxel one goes however it enhances."""
    config = PostprocessConfig(min_enhancing_voxels=100, enhancement_check_voxels=1000, min_enhancement=1.0,
                               fill_enclosed_core=False, drop_doubtful_components=False)
    labels, t1c, flat_t1 = _small_rim(t1_bright=False, block=(3, 10, 5))
    assert (labels == 3).sum() == 150
    np.testing.assert_array_equal(postprocess(labels, t1c, config, t1=flat_t1), labels)
    _, _, bright_t1 = _small_rim(t1_bright=True, block=(3, 10, 5))
    assert not (postprocess(labels, t1c, config, t1=bright_t1) == 3).any()
    speck, t1c, flat_t1 = _small_rim(t1_bright=False, block=(1, 10, 6))
    assert (speck == 3).sum() == 60
    assert not (postprocess(speck, t1c, config, t1=flat_t1) == 3).any()


def test_the_old_step3_is_restored_by_its_floor_without_the_check():
    """`--min-et-voxels 300 --et-check-voxels 0` is step 3 as it was before the check: a 150-voxel ET that
    enhances goes, and step 2 treats the tumour as non-enhancing (splits its edema), as today's default does
    with the same ET when it does not enhance."""
    labels, t1c, flat_t1 = _small_rim(t1_bright=False, block=(3, 10, 5))
    old = PostprocessConfig(min_enhancing_voxels=300, enhancement_check_voxels=0, fill_enclosed_core=False,
                            drop_doubtful_components=False)
    out = postprocess(labels, t1c, old, t1=flat_t1)
    assert not (out == 3).any() and (out == 1).sum() > 150  # the ET and the darker edema
    np.testing.assert_array_equal(out, drop_scant_enhancement(relabel_dark_edema(labels, t1c), 300))
    _, _, bright_t1 = _small_rim(t1_bright=True, block=(3, 10, 5))
    default = replace(old, min_enhancing_voxels=MIN_ENHANCING_VOXELS, enhancement_check_voxels=1000)
    np.testing.assert_array_equal(postprocess(labels, t1c, default, t1=bright_t1), out)


def test_the_pipeline_reads_t1_for_the_enhancement_check():
    """`complete_segmentation` hands post-processing the T1 and T1c channels of the image in MODALITY_ORDER."""
    labels, t1c, bright_t1 = _small_rim(t1_bright=True)
    _, _, flat_t1 = _small_rim(t1_bright=False)
    config = PostprocessConfig(fill_enclosed_core=False, drop_doubtful_components=False)
    box = tuple(slice(0, n) for n in labels.shape)
    kept = {}
    for name, t1 in (("bright", bright_t1), ("flat", flat_t1)):
        image = np.ones((4, *labels.shape), np.float32)
        image[MODALITY_ORDER.index(Modality.T1C)] = t1c
        image[MODALITY_ORDER.index(Modality.T1)] = t1
        kept[name] = (complete_segmentation(CasePrediction(labels, box, None, None), image, config).labels == 3).sum()
    assert kept == {"bright": 0, "flat": 600}


def _ring_tumour() -> tuple[np.ndarray, np.ndarray]:
    """Edema with an ET rim around a 6x6x6 centre the network called brain (0), open to the outside
    through a one-voxel channel along the first axis (so no 3D hole), beside a C-shaped edema open in every
    slice and an edema with a hole in every axial slice but no core."""
    labels = np.zeros((30, 40, 40), np.uint8)
    labels[5:25, 5:25, 5:25] = 2
    labels[9:21, 9:21, 9:21] = 3
    labels[12:18, 12:18, 12:18] = 0  # the centre
    labels[0:12, 14, 14] = 0  # the channel
    labels[5:25, 28:38, 28:38] = 2
    labels[5:25, 30:36, 30:38] = 0  # the C: open towards the last axis' end
    labels[5:25, 28:38, 2:12] = 2
    labels[5:25, 31:35, 5:9] = 0  # a hole only edema encloses, far from any core
    return labels, np.ones(labels.shape, np.float32)


def test_enclosed_core_becomes_necrosis_and_nothing_else_moves():
    labels, t1c = _ring_tumour()
    out = fill_enclosed_core(labels, t1c != 0)
    assert (out[12:18, 12:18, 12:18] == 1).all()  # the centre, although open in 3D
    changed = out != labels
    assert changed.sum() == 6 * 6 * 6 + 7  # and the channel's 7 voxels within the tumour (slices 5-11)
    np.testing.assert_array_equal(out == 3, labels == 3)  # ET never changes
    assert not out[5:25, 30:36, 30:38].any()  # the open C stays brain
    assert not out[5:25, 31:35, 5:9].any()  # and so does the hole that touches no core
    default = postprocess(labels, t1c, tumour_probability=_certain(labels), t1=t1c)
    assert (default[12:18, 12:18, 12:18] == 1).all()
    off = PostprocessConfig(fill_enclosed_core=False)
    assert not postprocess(labels, t1c, off, _certain(labels), t1=t1c)[12:18, 12:18, 12:18].any()


def test_edema_inside_an_enhancing_rim_becomes_necrosis():
    """Step 4b: a necrotic centre the network called edema (and brain within it), inside an ET rim open at
    both ends of one axis (a tube: no 3D hole, enclosed in every axial slice), with edema around the rim
    and, beside it, an edema lobe with no core at all."""
    labels = np.zeros((30, 40, 40), np.uint8)
    labels[2:28, 4:26, 4:26] = 2
    labels[:, 8:22, 8:22] = 3
    labels[:, 11:19, 11:19] = 2  # the centre, edema from end to end
    labels[10:20, 13:17, 13:17] = 0  # with brain inside that touches no core (step 4a leaves it)
    labels[5:25, 28:38, 28:38] = 2
    t1c = np.ones(labels.shape, np.float32)
    t1c[0, 11:19, 11:19] = 0  # one unscanned slice of the centre
    out = fill_enclosed_core(labels, t1c != 0)
    assert (out[1:, 11:19, 11:19] == 1).all()  # wherever scanned
    assert (out[0, 11:19, 11:19] == 2).all()
    changed = out != labels
    assert changed.sum() == 29 * 8 * 8
    np.testing.assert_array_equal(out == 3, labels == 3)  # ET never changes
    assert (out[5:25, 28:38, 28:38] == 2).all()  # edema outside any core stays edema
    assert (out[2:28, 4:8, 4:26] == 2).all()  # and so does the edema around the rim


def _certain(labels: np.ndarray) -> np.ndarray:
    """A task-1 tumour probability of 1 everywhere: step 5 keeps every component."""
    return np.ones(labels.shape, np.float32)


def _three_components() -> tuple[np.ndarray, np.ndarray]:
    """A large tumour the ensemble doubts (mean task-1 probability 0.3), an edema lobe it doubts (0.45) and
    a small core it believes (0.8), each a separate component."""
    labels = np.zeros((30, 40, 40), np.uint8)
    probability = np.zeros(labels.shape, np.float32)
    labels[2:20, 2:20, 2:20] = 2
    labels[8:14, 8:14, 8:14] = 3
    probability[2:20, 2:20, 2:20] = 0.3
    labels[2:10, 25:35, 25:35] = 2
    probability[2:10, 25:35, 25:35] = 0.45
    probability[2:10, 25:35, 25] = 0.9  # one brighter slice does not lift the mean (0.495) to even odds
    labels[22:28, 25:31, 2:8] = 1
    probability[22:28, 25:31, 2:8] = 0.8
    return labels, probability


def test_doubtful_components_go_and_always_spares_the_largest():
    labels, probability = _three_components()
    out = drop_doubtful_components(labels, probability, keep_largest=KeepLargest.ALWAYS)
    assert not out[2:10, 25:35, 25:35].any()  # mean 0.495 < 0.5
    np.testing.assert_array_equal(out[2:20, 2:20, 2:20], labels[2:20, 2:20, 2:20])  # largest, however doubtful
    np.testing.assert_array_equal(out[22:28, 25:31, 2:8], labels[22:28, 25:31, 2:8])  # believed
    assert (out != labels).sum() == 8 * 10 * 10
    np.testing.assert_array_equal(drop_doubtful_components(labels, _certain(labels)), labels)
    empty = np.zeros_like(labels)
    np.testing.assert_array_equal(drop_doubtful_components(empty, probability), empty)


def test_the_largest_goes_only_when_another_component_is_sure():
    labels, probability = _three_components()
    out = drop_doubtful_components(labels, probability)  # the default, most-core
    np.testing.assert_array_equal(out, drop_doubtful_components(labels, probability, keep_largest="when-none-sure"))
    assert not out[2:20, 2:20, 2:20].any() and not out[2:10, 25:35, 25:35].any()  # both under even odds
    np.testing.assert_array_equal(out[22:28, 25:31, 2:8], labels[22:28, 25:31, 2:8])  # the sure one stays
    assert (out > 0).sum() == 6 * 6 * 6
    assert holds_sure_component(labels, probability)
    edema_only = labels.copy()
    edema_only[22:28, 25:31, 2:8] = 2  # sure but no core: it does not vouch for itself as the tumour
    assert not holds_sure_component(edema_only, probability)  # the core lies in a doubtful component
    out = drop_doubtful_components(edema_only, probability, keep_largest="when-none-sure")
    np.testing.assert_array_equal(out, drop_doubtful_components(edema_only, probability, keep_largest="always"))
    np.testing.assert_array_equal(out[2:20, 2:20, 2:20], labels[2:20, 2:20, 2:20])
    probability[22:28, 25:31, 2:8] = 0.4  # none sure: the largest stays, as with ALWAYS
    for keep in (KeepLargest.ALWAYS, KeepLargest.WHEN_NONE_SURE):
        out = drop_doubtful_components(labels, probability, keep_largest=keep.value)
        np.testing.assert_array_equal(out, drop_doubtful_components(labels, probability, keep_largest="always"))
        np.testing.assert_array_equal(out[2:20, 2:20, 2:20], labels[2:20, 2:20, 2:20])
        assert (out > 0).sum() == 18 ** 3
    t1c = np.ones(labels.shape, np.float32)
    probability[22:28, 25:31, 2:8] = 0.8
    config = PostprocessConfig(remove_small_components=False, edema_relabel=EdemaRelabel.OFF, min_enhancing_voxels=0,
                               fill_enclosed_core=False, keep_largest="when-none-sure")  # step 1 would take it
    assert config.keep_largest is KeepLargest.WHEN_NONE_SURE
    assert PostprocessConfig().keep_largest is KeepLargest.MOST_CORE
    assert not postprocess(labels, t1c, config, tumour_probability=probability, t1=t1c)[2:20, 2:20, 2:20].any()
    with pytest.raises(ValueError, match="keep_largest must be one of"):
        PostprocessConfig(keep_largest="biggest")


def test_most_core_spares_the_component_holding_the_most_core():
    """sig7 07009 at --scales 1.25 (round 52): a small enhancing tumour the whole-brain task doubts, a larger
    doubtful lobe of edema alone and a sure one of edema alone; none vouches for itself as the tumour."""
    labels = np.zeros((30, 40, 40), np.uint8)
    probability = np.zeros(labels.shape, np.float32)
    labels[2:20, 2:20, 2:20] = 2  # the largest: edema alone, doubtful
    probability[2:20, 2:20, 2:20] = 0.3
    labels[2:10, 25:35, 25:35] = 2  # the tumour: ET inside edema, doubtful
    labels[4:8, 28:32, 28:32] = 3
    probability[2:10, 25:35, 25:35] = 0.45
    labels[22:28, 25:31, 2:8] = 2  # edema alone, sure: it does not vouch
    probability[22:28, 25:31, 2:8] = 0.8
    tumour, largest, sure = (np.s_[2:10, 25:35, 25:35], np.s_[2:20, 2:20, 2:20], np.s_[22:28, 25:31, 2:8])
    largest_kept = drop_doubtful_components(labels, probability, keep_largest="when-none-sure")
    assert largest_kept[largest].all() and not largest_kept[tumour].any() and largest_kept[sure].all()
    out = drop_doubtful_components(labels, probability)  # the default, most-core
    np.testing.assert_array_equal(out[tumour], labels[tumour])
    assert not out[largest].any() and out[sure].all()
    assert (out > 0).sum() == 8 * 10 * 10 + 6 ** 3
    labels[labels == 3] = 2  # no core anywhere: the largest, as with WHEN_NONE_SURE
    np.testing.assert_array_equal(drop_doubtful_components(labels, probability, keep_largest="most-core"),
                                  drop_doubtful_components(labels, probability, keep_largest="when-none-sure"))
    labels[4:8, 28:32, 28:32] = 3
    labels[23:25, 26:28, 3:5] = 1  # the sure lobe holds core: it vouches, and both doubtful ones go
    out = drop_doubtful_components(labels, probability, keep_largest=KeepLargest.MOST_CORE)
    np.testing.assert_array_equal(out, drop_doubtful_components(labels, probability, keep_largest="when-none-sure"))
    assert (out > 0).sum() == 6 ** 3


def test_step5_is_on_by_default_and_needs_the_probability():
    labels, probability = _three_components()
    t1c = np.ones(labels.shape, np.float32)
    assert not postprocess(labels, t1c, tumour_probability=probability, t1=t1c)[2:10, 25:35, 25:35].any()
    kept = postprocess(labels, t1c, PostprocessConfig(drop_doubtful_components=False), t1=t1c)
    assert (kept[2:10, 25:35, 25:35] == 2).all()
    with pytest.raises(ValueError, match="needs the task-1 tumour probability"):
        postprocess(labels, t1c, t1=t1c)
    with pytest.raises(ValueError, match="tumour probability"):
        postprocess(labels, t1c, tumour_probability=probability[:-1], t1=t1c)


def test_the_pipeline_reads_step5s_probability_from_the_prediction_box():
    """`complete_segmentation` hands post-processing task 1's probability, placed at the prediction's brain
    box within the whole volume."""
    labels, probability = _three_components()
    volume = np.zeros((40, 50, 48), np.uint8)
    box = (slice(5, 35), slice(6, 46), slice(4, 44))
    volume[box] = labels
    classes = np.zeros((5, *labels.shape), np.float32)
    p = TaskProbabilities(tumour=probability, classes=classes, enhancing=np.zeros(labels.shape, np.float32))
    image = np.ones((4, *volume.shape), np.float32)
    config = PostprocessConfig(remove_small_components=False, edema_relabel=EdemaRelabel.OFF, min_enhancing_voxels=0,
                               fill_enclosed_core=False)
    out = complete_segmentation(CasePrediction(volume, box, p, None), image, config).labels
    np.testing.assert_array_equal(out[box], drop_doubtful_components(labels, probability))
    assert (out[box] != labels).any() and not out[tuple(slice(0, s.start) for s in box)].any()


def test_core_islands_become_the_region_around_them_and_the_largest_stays():
    """Step 6: an ET speck becomes NCR/NET, a core speck (NCR/NET, or ET that was a speck) becomes edema; the
    largest core and ET stay however small; WT never changes; 0 switches the step off."""
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:35, 5:35, 5:35] = 2
    labels[10:20, 10:20, 10:20] = 1
    labels[12:16, 12:16, 12:16] = 3  # the largest ET, inside the largest core: both stay
    labels[28:30, 28:30, 28:30] = 3  # an ET speck of 8 voxels alone in the edema: core speck too
    labels[28:31, 8:11, 28:31] = 1  # an NCR/NET speck of 27 voxels
    labels[25:29, 25:29, 8:10] = 1  # a core component of 32 voxels: kept at 30
    labels[26, 26, 8] = 3  # with an ET speck of 1 voxel, which becomes NCR/NET
    out = drop_core_islands(labels, 30)
    assert (out[28:30, 28:30, 28:30] == 2).all() and (out[28:31, 8:11, 28:31] == 2).all()
    assert (out[25:29, 25:29, 8:10] == 1).all()
    assert (out[12:16, 12:16, 12:16] == 3).all() and (out[10:20, 10:20, 10:20] > 0).all()
    assert np.array_equal(out > 0, labels > 0)
    lone = np.zeros_like(labels)
    lone[5:35, 5:35, 5:35] = 2
    lone[20, 20, 20] = 3  # the only core: the largest, so it stays
    assert np.array_equal(drop_core_islands(lone, 30), lone)
    t1c = np.ones(labels.shape, np.float32)
    assert np.array_equal(postprocess(labels, t1c, PostprocessConfig.off()), labels)
    default = PostprocessConfig(edema_relabel=EdemaRelabel.OFF, min_enhancing_voxels=0, fill_enclosed_core=False,
                                drop_doubtful_components=False)
    assert np.array_equal(postprocess(labels, t1c, default), out)
    assert np.array_equal(postprocess(labels, t1c, replace(default, min_island_voxels=0)), labels)
    with pytest.raises(ValueError, match="min_island_voxels must be >= 0"):
        PostprocessConfig(min_island_voxels=-1)


def test_enclosed_background_outside_the_scan_is_not_filled():
    labels, t1c = _ring_tumour()
    t1c[12:18, 12:18, 12:18] = 0  # e.g. a resection cavity masked out of the images
    out = fill_enclosed_core(labels, t1c != 0)
    assert not out[12:18, 12:18, 12:18].any()


@pytest.mark.parametrize("shape", [(37, 53, 41), (150, 170, 140)])
@pytest.mark.parametrize("shift", [(0, 0, 0), (3, 3, 3), (4, 0, 7)])
def test_tiles_partition_the_volume(shape, shift):
    for tile, keep in [((16, 32, 32), (5, 20, 20)), fast_tiles(shape, (64, 96, 96), 8)]:
        shift = tuple(min(s, k - 1) for s, k in zip(shift, keep))
        cover = np.zeros(shape, np.int32)
        for t in plan_tiles(shape, tile, keep, shift):
            cover[t.keep] += 1
            assert [s.stop - s.start for s in t.source] == list(tile)
            # the kept voxels are the same ones seen from the tile
            assert all(k.start - s.start == i.start and k.stop - s.start == i.stop
                       for k, s, i in zip(t.keep, t.source, t.keep_in_tile))
        assert (cover == 1).all()


def test_grid_shift_outside_the_kept_window_is_refused():
    with pytest.raises(ValueError, match="grid shift"):
        plan_tiles((40, 40, 40), (16, 32, 32), (5, 20, 20), (5, 0, 0))


class _PointwiseNet(nn.Module):
    """Three 1x1x1 heads: its output at a voxel depends on that voxel alone, whatever the tile."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = nn.ModuleList(nn.Conv3d(4, c, 1) for c in (5, 5, 2))

    def forward(self, x):
        return tuple(head(x) for head in self.heads)


def test_each_fold_gets_its_own_grid_and_the_bookkeeping_is_exact():
    """With a network that ignores context, shifted grids must give exactly the unshifted answer."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 29, 61, 50)).astype(np.float32)
    models = [_PointwiseNet(k) for k in range(3)]
    options = {"device": "cpu", "max_tile": (16, 24, 24), "margin": 2, "precision": "fp32"}
    shifted = EnsemblePredictor(**options).load_models(models)
    same = EnsemblePredictor(**options, shift_folds=False).load_models(models)
    assert [shifted.planner.grid_shift(k) for k in range(3)] == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    assert shifted.plan(image.shape[1:], 1) != shifted.plan(image.shape[1:], 0)
    assert same.plan(image.shape[1:], 1) == same.plan(image.shape[1:], 0)
    paper = EnsemblePredictor(device="cpu", tiling="paper")
    assert paper.planner.grid_shift(5) == (0, 0, 0)
    a, b = shifted.predict_probabilities(image), same.predict_probabilities(image)
    for x, y in zip((a.tumour, a.classes, a.enhancing), (b.tumour, b.classes, b.enhancing)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_shifted_grids_fit_tiles_with_tiny_kept_windows():
    predictor = EnsemblePredictor(device="cpu", max_tile=(8, 8, 8), margin=3)
    cover = np.zeros((20, 21, 9), np.int32)
    for t in predictor.plan(cover.shape, fold_index=7):
        cover[t.keep] += 1
    assert (cover == 1).all()


def test_fast_tiling_covers_the_brain_box_and_reads_the_ring_around_it_as_context():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(4, 29, 61, 50)).astype(np.float32)
    brain = np.zeros(image.shape[1:], bool)
    brain[4:25, 4:57, 4:46] = True
    models = [_PointwiseNet(k) for k in range(2)]
    fast = EnsemblePredictor(device="cpu", max_tile=(16, 24, 24), precision="fp32").load_models(models)
    region = fast.planner.segmented_region(brain)
    assert region == (slice(4, 25), slice(4, 57), slice(4, 46))
    assert EnsemblePredictor(device="cpu", tiling="paper").planner.segmented_region(brain) is None
    covered, everywhere = fast.predict_probabilities(image, region=region), fast.predict_probabilities(image)
    for x, y in zip((covered.tumour, covered.classes, covered.enhancing),
                    (everywhere.tumour, everywhere.classes, everywhere.enhancing)):
        np.testing.assert_allclose(x[..., 4:25, 4:57, 4:46], y[..., 4:25, 4:57, 4:46], rtol=1e-5, atol=1e-6)
        assert not x[..., :4, :, :].any() and not x[..., :, 57:, :].any()


class _ContextNet(nn.Module):
    """One 3x3x3 convolution per head with random (not mirror-symmetric) kernels: its output depends on the
    neighbourhood's orientation, so mirroring changes it."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = nn.ModuleList(nn.Conv3d(4, c, 3, padding=1) for c in (5, 5, 2))

    def forward(self, x):
        return tuple(head(x) for head in self.heads)


def _flip_back(p, axes):
    """TaskProbabilities of a mirrored image, mirrored back (axes of a (C, D, H, W) image)."""
    scalar = tuple(a - 1 for a in axes)
    return np.flip(p.tumour, scalar), np.flip(p.classes, axes), np.flip(p.enhancing, scalar)


def test_full_mirroring_averages_the_eight_mirror_images_flipped_back():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(4, 16, 24, 32)).astype(np.float32)
    models = [_ContextNet(7)]
    options = {"device": "cpu", "max_tile": (16, 24, 32), "margin": 2, "precision": "fp32"}
    full = EnsemblePredictor(**options, tta="full").load_models(models).predict_probabilities(image)
    plain = EnsemblePredictor(**options).load_models(models)
    expected = [np.zeros_like(full.tumour), np.zeros_like(full.classes), np.zeros_like(full.enhancing)]
    for batch_axes in MIRRORS:
        axes = tuple(a - 1 for a in batch_axes)  # image axes (C, D, H, W)
        mirrored = np.ascontiguousarray(np.flip(image, axes)) if axes else image
        for total, part in zip(expected, _flip_back(plain.predict_probabilities(mirrored), axes)):
            total += part / len(MIRRORS)
    for got, want in zip((full.tumour, full.classes, full.enhancing), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    unmirrored = plain.predict_probabilities(image)
    assert not np.allclose(full.classes, unmirrored.classes, atol=1e-4), "mirroring should matter here"


def test_mirroring_leaves_a_pointwise_network_unchanged_and_folds_take_turns():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(4, 21, 30, 27)).astype(np.float32)
    models = [_PointwiseNet(k) for k in range(3)]
    options = {"device": "cpu", "max_tile": (16, 24, 24), "margin": 2, "precision": "fp32"}
    results = {tta: EnsemblePredictor(**options, tta=tta).load_models(models).predict_probabilities(image)
               for tta in ("none", "folds", "full")}
    for tta in ("folds", "full"):
        np.testing.assert_allclose(results[tta].classes, results["none"].classes, rtol=1e-5, atol=1e-6)
    folds = EnsemblePredictor(device="cpu", tta="folds")
    assert [folds.mirrors(k) for k in (0, 1, 9)] == [(MIRRORS[0],), (MIRRORS[1],), (MIRRORS[1],)]
    with pytest.raises(ValueError, match="tta must be one of"):
        EnsemblePredictor(device="cpu", tta="sometimes")


def _zoom(volume: np.ndarray, shape) -> np.ndarray:
    """Trilinear resampling of the spatial (last three) axes to ``shape``, by scipy (voxel centres kept)."""
    factors = [1.0] * (volume.ndim - 3) + [m / n for m, n in zip(shape, volume.shape[-3:])]
    return ndimage.zoom(volume, factors, order=1, grid_mode=True, mode="nearest")


def test_scales_average_a_pass_on_the_enlarged_crop_resampled_back():
    rng = np.random.default_rng(4)
    image = np.zeros((4, 16, 24, 24), np.float32)
    image[:, 2:14, 3:21, 4:20] = rng.normal(size=(4, 12, 18, 16))  # the brain; 0 outside, as normalised
    region = (slice(2, 14), slice(3, 21), slice(4, 20))
    models = [_ContextNet(5)]
    options = {"device": "cpu", "max_tile": (16, 24, 24), "margin": 2, "precision": "fp32"}
    plain = EnsemblePredictor(**options).load_models(models)
    scaled = EnsemblePredictor(**options, scales=(1.0, 1.25)).load_models(models)
    calls = []
    got = scaled.predict_probabilities(image, progress=lambda done, total: calls.append((done, total)),
                                       region=region)
    large = (20, 30, 30)
    brain = _zoom((image != 0).any(0).astype(np.float32), large) > 0.5
    enlarged = plain.predict_probabilities(np.ascontiguousarray(_zoom(image, large) * brain))
    at_one = plain.predict_probabilities(image, region=region)
    for name in ("tumour", "classes", "enhancing"):
        want = (getattr(at_one, name) + _zoom(getattr(enlarged, name), image.shape[1:])) / 2
        np.testing.assert_allclose(getattr(got, name)[(..., *region)], want[(..., *region)], atol=1e-5)
        outside = getattr(got, name).copy()
        outside[(..., *region)] = 0
        assert not outside.any(), "probabilities outside the region must stay 0, as at scale 1"
    assert not np.allclose(got.classes, at_one.classes, atol=1e-3), "the enlarged pass should matter here"
    # One progress count over both passes, ending at the total.
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == calls[-1][1]
    assert len({t for _, t in calls}) == 1 and calls[-1][1] > len(plain.plan(image.shape[1:], 0, region))


def test_a_scaled_pass_is_planned_from_shapes_alone():
    """The passes are planned before any crop is resampled (one enlarged crop held at a time), so the shape
    and region computed from the crop's shape must be those of the crop really resampled."""
    image = torch.zeros((4, 16, 24, 24))
    image[:, 2:14, 3:21, 4:20] = 1.0
    region = (slice(2, 14), slice(3, 21), slice(4, 20))
    for scale in (0.5, 1.0, 1.25, 2.0):
        shape = scaled_shape(image.shape[1:], scale)
        resampled = scaled_input(image, scale)
        assert tuple(resampled.shape) == (4, *shape)
        carried = scaled_region(region, image.shape[1:], shape)
        brain = resampled.any(0)
        outside = brain.clone()
        outside[carried] = False
        assert brain.any() and not outside.any(), f"scale {scale}: the carried region must hold the brain"
    assert scaled_input(image, 1.0) is image and scaled_region(region, (16, 24, 24), (16, 24, 24)) == region
    assert scaled_region(None, (16, 24, 24), (20, 30, 30)) is None
    assert scaled_region(region, (16, 24, 24), (20, 30, 30)) == (slice(1, 19), slice(2, 28), slice(4, 26))


def test_the_scout_runs_at_scale_one_and_bad_scales_are_refused():
    image = np.zeros((4, 16, 24, 24), np.float32)
    image[:, 2:14, 3:21, 4:20] = np.random.default_rng(5).normal(5, 1, size=(4, 12, 18, 16))
    options = {"device": "cpu", "max_tile": (16, 24, 24), "precision": "fp32"}
    models = [_ContextNet(1), _ContextNet(2)]
    scaled = EnsemblePredictor(**options, scales=(1.0, 1.5)).load_models(models)
    plain = EnsemblePredictor(**options).load_models(models)
    np.testing.assert_array_equal(scaled.scout_tumour(image), plain.scout_tumour(image))
    for scales, message in [((), "at least one"), ((1.0, 1.0), "distinct"), ((1.0, 2.5), r"\[0.5, 2\]")]:
        with pytest.raises(ValueError, match=message):
            EnsemblePredictor(device="cpu", scales=scales)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_fusion_gives_the_numpy_fusion_labels(seed):
    """`fuse_tensors` (used on a GPU) must match `fuse` voxel for voxel, tumours at the border included."""
    rng = np.random.default_rng(seed)
    shape = (23, 31, 29)
    tumour = np.zeros(shape, np.float32)
    for _ in range(3):  # blobs of tumour probability, one touching the volume's edge
        centre = rng.integers(0, shape)
        grid = np.indices(shape)
        tumour += np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / 20.0).astype(np.float32)
    tumour = np.clip(tumour, 0, 1)
    classes = rng.dirichlet(np.ones(5), size=shape).astype(np.float32)
    p = TaskProbabilities(tumour, np.moveaxis(classes, -1, 0).copy(), rng.random(shape).astype(np.float32))
    on_device = TaskProbabilities(*(torch.from_numpy(a) for a in (p.tumour, p.classes, p.enhancing)))
    for rule in Fusion:
        for thresholds in (FusionThresholds(), FusionThresholds(tumour=0.3, core=0.6, enhancing=0.4)):
            labels, region = fuse_tensors(on_device, rule, thresholds)
            np.testing.assert_array_equal(region.numpy(), fusion_region(p))
            np.testing.assert_array_equal(labels.numpy(), fuse(p, rule=rule, thresholds=thresholds))
    assert region.numpy().sum() > (tumour > 0.5).sum() > 0
    assert (fuse(p, rule=Fusion.PAPER) != fuse(p, rule=Fusion.REGIONS)).any()  # the rules differ here


def test_region_fusion_decides_tumour_then_core_where_the_argmax_does_not():
    """A voxel whose likeliest single class is brain (0.40) while the tumour's classes hold 0.55, and whose
    core (NCR 0.20 + ET 0.15) outweighs its edema (0.20); and one whose edema (0.30) beats each core class
    (0.25, 0.20) but not the two together."""
    tumour = np.full(SHAPE, 0.9, np.float32)
    classes = np.zeros((5, *SHAPE), np.float32)
    classes[:, 0] = np.array([0.05, 0.20, 0.20, 0.15, 0.40])[:, None, None]
    classes[:, 1] = np.array([0.05, 0.25, 0.30, 0.20, 0.20])[:, None, None]
    classes[:, 2:] = np.array([0.05, 0.05, 0.05, 0.05, 0.80])[:, None, None, None]
    p = TaskProbabilities(tumour, classes, np.zeros(SHAPE, np.float32))
    paper, regions = fuse(p, rule=Fusion.PAPER), fuse(p, rule=Fusion.REGIONS)
    assert (paper[0] == 0).all() and (regions[0] == 1).all()
    assert (paper[1] == 2).all() and (regions[1] == 1).all()
    assert not paper[2:].any() and not regions[2:].any()
    assert fuse(p)[0, 0, 0] == 1  # regions by default
    with pytest.raises(ValueError, match="fusion must be one of"):
        EnsemblePredictor(device="cpu", fusion="vote")


def test_device_dilation_is_the_euclidean_ball():
    mask = np.zeros((15, 15, 15), bool)
    mask[7, 7, 7] = True
    mask[0, 14, 3] = True
    for radius in (0, 1, 2, 5):
        np.testing.assert_array_equal(dilate_tensor(torch.from_numpy(mask), radius).numpy(), dilate(mask, radius))


def test_fusion_thresholds_move_each_decision_and_are_validated():
    """A voxel with tumour 0.55 of which core 0.25 (NCR 0.15 + ET 0.10), task 3 ET 0.45: edema at the even
    odds; core once the core share drops to 0.4; ET once task 3's threshold drops to 0.4; not tumour once the
    tumour threshold rises to 0.6."""
    tumour = np.zeros(SHAPE, np.float32)
    tumour[5:10, 10:20, 10:20] = 0.9
    classes = np.zeros((5, *SHAPE), np.float32)
    classes[0] = 1.0
    voxel = (7, 15, 15)
    classes[(slice(None), *voxel)] = [0.45, 0.15, 0.30, 0.10, 0.0]
    enhancing = np.zeros(SHAPE, np.float32)
    enhancing[voxel] = 0.45
    p = TaskProbabilities(tumour, classes, enhancing)
    assert fuse(p)[voxel] == 2
    assert fuse(p, thresholds=FusionThresholds(core=0.4))[voxel] == 1
    assert fuse(p, thresholds=FusionThresholds(core=0.4, enhancing=0.4))[voxel] == 3
    assert fuse(p, thresholds=FusionThresholds(tumour=0.6))[voxel] == 0
    for bad in ({"tumour": 0.0}, {"core": 1.0}, {"enhancing": -0.1}):
        with pytest.raises(ValueError, match="fusion threshold"):
            FusionThresholds(**bad)
