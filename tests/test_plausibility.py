import sys
from pathlib import Path

import numpy as np
import pytest

from app.case_warnings import WarningCode
from app.conventions import MODALITY_ORDER, Modality
from app.phantoms import DEFAULT_RANGES, WIDE_RANGES, make_phantom
from app.plausibility import content_warnings, copied_modalities, csf_contrast, nonzero_border_share

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
