"""What the networks read of a case (`preprocess.normalise`): each modality z-scored inside the brain, and a
modality that does not cover the brain read as average where it is zero."""

import numpy as np

from app.case_warnings import WarningCode
from app.conventions import MODALITY_ORDER
from app.plausibility import check_images
from app.postprocess import enhancement
from app.preprocess import MAX_UNCOVERED_SHARE, brain_mask, normalise, uncovered, zscore_parameters


def _case(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((4, 20, 24, 28), np.float32)
    image[:, 2:18, 3:21, 4:24] = rng.uniform(50, 150, (4, 16, 18, 20))
    return image


def test_a_modality_zero_over_part_of_the_brain_is_read_as_average_there():
    """T1c stripped of a rim (zero over 20% of the brain the others cover) is z-scored over its own voxels and
    reads 0 where it is zero, instead of tissue darker than any; elsewhere it reads as the covered part alone
    would, and the other modalities do not change."""
    image = _case()
    brain = brain_mask(image)
    t1c = 2
    rim = brain & ~np.pad(np.ones((12, 18, 20), bool), ((4, 4), (3, 3), (4, 4)))
    stripped = image.copy()
    stripped[t1c][rim] = 0
    assert 0.1 < rim.sum() / brain.sum() < 0.5
    read = normalise(stripped)
    assert (read[t1c][rim] == 0).all()
    covered = brain & ~rim
    values = image[t1c][covered].astype(np.float64)
    np.testing.assert_allclose(read[t1c][covered], (values - values.mean()) / values.std(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.delete(read, t1c, 0), np.delete(normalise(image), t1c, 0))


def test_a_few_zero_voxels_inside_the_brain_are_read_as_before():
    """Under `MAX_UNCOVERED_SHARE` of the brain at 0 (dark voxels stored as 0) nothing changes: the zeros
    count in the statistics and read as the darkest values."""
    image = _case(1)
    brain = brain_mask(image)
    few = np.flatnonzero(brain.ravel())[:: int(2 / MAX_UNCOVERED_SHARE)]
    image[0].ravel()[few] = 0
    values = image[0][brain].astype(np.float64)
    assert zscore_parameters(image[0][brain]) == (values.mean(), values.std())
    np.testing.assert_allclose(normalise(image)[0][brain], (values - values.mean()) / values.std(), atol=1e-5)


def test_the_enhancement_check_reads_a_stripped_modality_as_normalise_does():
    """Post-processing's enhancement check z-scores T1c and T1 as `normalise` does: an enhancing blob reads the
    same whether or not the T1c lost a rim far from it."""
    image = _case(2)
    t1c, t1 = image[2].copy(), image[1].copy()
    et = np.zeros(t1c.shape, bool)
    et[8:12, 10:14, 12:16] = True
    t1c[et] += 200
    rimmed = t1c.copy()
    rimmed[2:18, 3:21, 4:6] = 0  # two of the brain's 20 columns
    assert abs(enhancement(et, rimmed, t1) - enhancement(et, t1c, t1)) < 0.15 * enhancement(et, t1c, t1)


def test_zeros_the_modality_s_own_tissue_encloses_are_its_values_not_a_gap():
    """A FLAIR whose ventricle (5% of the brain) is stored as 0 reads as before: those zeros are enclosed by
    its own tissue, not one piece with the background, so they count as its darkest values."""
    image = _case(4)
    brain = brain_mask(image)
    image[0, 7:13, 9:15, 10:18] = 0
    assert 0.03 < np.count_nonzero(brain & (image[0] == 0)) / brain.sum() < 0.1
    assert uncovered(image[0], brain) is None
    values = image[0][brain].astype(np.float64)
    np.testing.assert_allclose(normalise(image)[0][brain], (values - values.mean()) / values.std(), atol=1e-5)
    assert check_images(image, MODALITY_ORDER, 0.001).warnings() == []


def test_the_image_checks_measure_each_modality_s_gap_and_warn_over_1_percent():
    image = _case(3)
    assert check_images(image, MODALITY_ORDER, 0.001).uncovered == (0.0, 0.0, 0.0, 0.0)
    image[3, 2:18, 3:21, 4:7] = 0  # T2 missing three of the brain's 20 columns, at its edge
    checks = check_images(image, MODALITY_ORDER, 0.001)
    assert checks.uncovered[3] == 0.15 and checks.uncovered[:3] == (0.0, 0.0, 0.0)
    [warning] = checks.warnings()
    assert warning.code is WarningCode.PARTIAL_COVERAGE and "over t2 15% of it" in warning.message
    assert checks.as_report()["uncovered"] == {"flair": 0.0, "t1": 0.0, "t1c": 0.0, "t2": 0.15}
