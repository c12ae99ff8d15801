import json
import sys
from pathlib import Path

import numpy as np
import pytest

from app.case_warnings import WarningCode
from app.conventions import MODALITY_ORDER, Modality
from app.phantoms import DEFAULT_RANGES, WIDE_RANGES, make_phantom
from app.plausibility import (
    check_images,
    content_warnings,
    copied_modalities,
    csf_contrast,
    enhancement_asymmetry,
    nonzero_border_share,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import signal_phantoms  # noqa: E402

_SIZE = (96, 96, 64)


def _phantom_image(index: int, ranges) -> np.ndarray:
    phantom = make_phantom(61, index, _SIZE, ranges=ranges)
    return np.stack([phantom.images[m].astype(np.float32) for m in MODALITY_ORDER])


def test_nonzero_border_share_tells_a_stripped_brain_from_a_noisy_head():
    image = np.zeros((4, 10, 12, 14), np.float32)
    image[:, 2:8, 2:10, 2:12] = 1  # a brain inside its volume
    assert nonzero_border_share(image) == 0.0
    image[3, 0] = 5  # one face of one modality: a sixth of the border's voxels or more
    assert 1 / 6 < nonzero_border_share(image) < 0.5
    image[1] += np.random.default_rng(0).uniform(1, 2, image.shape[1:])  # noise everywhere in T1
    assert nonzero_border_share(image) == 1.0
    with pytest.raises(ValueError, match="expected"):
        nonzero_border_share(image[0])


def test_more_nonzero_voxels_than_a_brain_holds_earn_the_unstripped_warning():
    """A head stored over a background of 0 has a border of 0 but more nonzero voxels than a brain (2,500 ml):
    the unstripped warning; the same voxels read as a small brain's earn none."""
    image = _phantom_image(0, DEFAULT_RANGES)
    voxels = np.count_nonzero((image != 0).any(0))
    assert content_warnings(image, MODALITY_ORDER, 0.001) == []
    warnings = content_warnings(image, MODALITY_ORDER, 3000 / voxels)
    [warning] = [w for w in warnings if w.code is WarningCode.UNSTRIPPED_BORDER]
    assert warning.message.startswith("3000 ml of nonzero voxels, more than a brain holds: is the case skull-stripped?")


@pytest.mark.parametrize("ranges", [DEFAULT_RANGES, WIDE_RANGES], ids=["training", "wide"])
def test_a_modality_filled_with_a_copy_of_another_is_found_and_distinct_ones_are_not(ranges):
    """T1 copied into T1c's place, rescaled and rounded as a converter stores it, is one image; four distinct
    contrasts never are, nor is a constant channel (no correlation at all). (These brains hold under 400 ml:
    the FLAIR/T2 check is not made on them.)"""
    for index in range(3):
        image = _phantom_image(index, ranges)
        assert copied_modalities(image) == []
        assert content_warnings(image, MODALITY_ORDER, 0.001) == []
    t1, t1c = MODALITY_ORDER.index(Modality.T1), MODALITY_ORDER.index(Modality.T1C)
    image[t1c] = np.round(image[t1] * 0.05 + 3) * (image[t1] != 0)
    [(a, b, correlation)] = copied_modalities(image)
    assert (a, b) == (min(t1, t1c), max(t1, t1c)) and correlation > 0.999
    [warning] = content_warnings(image, MODALITY_ORDER, 0.001)
    assert warning.code is WarningCode.COPIED_MODALITY
    assert warning.message.startswith("t1 and t1c hold the same image (correlation ")
    image[t1c] = 7.0
    assert copied_modalities(image) == []
    with pytest.raises(ValueError, match="expected"):
        copied_modalities(image[0])


@pytest.mark.parametrize("generator", ["ours", "second"])
def test_flair_and_t2_named_the_other_way_round_are_told_apart(generator):
    """At the BraTS size, CSF (darkest on T1) stands out on T2 above FLAIR in a case named right, and the
    same case with the two files' names exchanged earns the warning; a case named right earns none."""
    if generator == "ours":
        phantom = make_phantom(62, 0, ranges=WIDE_RANGES)
        image = np.stack([phantom.images[m].astype(np.float32) for m in MODALITY_ORDER])
    else:
        case = signal_phantoms.make_case(62, 0)
        image = np.stack([case.images[m.value].astype(np.float32) for m in MODALITY_ORDER])
    assert csf_contrast(image, MODALITY_ORDER) > 0.2
    assert content_warnings(image, MODALITY_ORDER, 0.001) == []
    swapped = [Modality.T2, Modality.T1, Modality.T1C, Modality.FLAIR]  # the files, as the case names them
    [warning] = content_warnings(image, swapped, 0.001)
    assert warning.code is WarningCode.SWAPPED_FLAIR_T2
    assert warning.message.startswith("flair and t2 look swapped: CSF (darkest on t1) is brighter on the flair")
    assert content_warnings(image, swapped, 0.0002) == []  # under 400 ml: too small a brain to judge
    with pytest.raises(ValueError, match="3 modality names for 4 channels"):
        csf_contrast(image, MODALITY_ORDER[:3])


def test_enhancement_asymmetry_reads_which_file_holds_the_enhancement():
    """Where T1c is T1 plus noise the tails of z(t1c) - z(t1) balance; a blob far brighter on T1c (an
    enhancing rim) lengthens the upper one, and the same files named the other way round give the negative.
    Too few voxels both cover: None."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (4, 40, 40, 40)).astype(np.float32)
    t1, t1c = MODALITY_ORDER.index(Modality.T1), MODALITY_ORDER.index(Modality.T1C)
    image[t1c] = 2 * image[t1] + rng.normal(0, 5, image.shape[1:])
    assert abs(enhancement_asymmetry(image, MODALITY_ORDER)) < 0.5
    image[t1c, 10:16, 10:16, 10:16] *= 2  # 0.3% of the voxels
    asymmetry = enhancement_asymmetry(image, MODALITY_ORDER)
    assert asymmetry > 2
    swapped = [Modality.FLAIR, Modality.T1C, Modality.T1, Modality.T2]
    assert enhancement_asymmetry(image, swapped) == pytest.approx(-asymmetry)
    image[t1, 2:] = 0
    assert enhancement_asymmetry(image, MODALITY_ORDER) is None


def test_the_measurements_behind_the_warnings_are_kept_for_the_report():
    """`check_images` keeps what it measured: every pair's correlation (None for a constant channel, which the
    report's JSON writes as null), the border share, the brain's volume and, in a brain of 400 ml or more
    only, the CSF contrast; its warnings are `content_warnings`'s."""
    image = _phantom_image(0, DEFAULT_RANGES)
    t1, t1c = MODALITY_ORDER.index(Modality.T1), MODALITY_ORDER.index(Modality.T1C)
    image[t1c] = image[t1] * 3
    image[MODALITY_ORDER.index(Modality.T2)] = 5.0 * (image[t1] != 0)
    small = check_images(image, MODALITY_ORDER, 0.001)
    brain_ml = np.count_nonzero((image != 0).any(0)) * 0.001
    assert small.brain_ml == pytest.approx(brain_ml) and brain_ml < 400 and small.csf_contrast is None
    assert small.warnings() == content_warnings(image, MODALITY_ORDER, 0.001)
    assert [w.code for w in small.warnings()] == [WarningCode.COPIED_MODALITY]
    report = json.loads(json.dumps(small.as_report(), allow_nan=False))
    assert set(report) == {"border_share", "brain_ml", "uncovered", "correlations", "csf_contrast",
                           "enhancement_asymmetry"}
    assert report["border_share"] == 0.0 and report["csf_contrast"] is None and report["enhancement_asymmetry"] is None
    assert set(report["correlations"]) == {"flair/t1", "flair/t1c", "flair/t2", "t1/t1c", "t1/t2", "t1c/t2"}
    assert report["correlations"]["t1/t1c"] == 1.0 and report["correlations"]["t1/t2"] is None
    assert -1 < report["correlations"]["flair/t1"] < 0.999
    assert check_images(image, MODALITY_ORDER, 0.01).csf_contrast is not None  # the same brain at 10x the volume
    with pytest.raises(ValueError, match="3 modality names for 4 channels"):
        check_images(image, MODALITY_ORDER[:3], 0.001)
