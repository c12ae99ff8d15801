"""N4 bias correction (`--bias-correction n4`): what it removes, what it leaves alone, and the product path."""

import numpy as np
import pytest
import SimpleITK as sitk

from app.case_warnings import WarningCode
from app.conventions import MODALITY_ORDER, Modality
from app.inference import SCOUT_DILATION, EnsemblePredictor, scout_mask
from app.options import BiasCorrection
from app.phantoms import _smooth_field, make_phantom
from app.pipeline import segment_image
from app.postprocess import PostprocessConfig
from app.preprocess import bounding_box, brain_mask, clipped_margin, correct_bias, n4_shrink_factor
from app.weights import load_ensemble

from .helpers import random_weights, run_cli, small_cases

SIZE = (96, 96, 64)


@pytest.fixture(scope="module")
def phantom_image() -> np.ndarray:
    phantom = make_phantom(7, 0, SIZE)
    return np.stack([phantom.images[m].astype(np.float32) for m in MODALITY_ORDER])


def _log_spread(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Spread (std) of the log ratio inside ``mask``: 0 when ``image`` is ``reference`` times a constant."""
    return float(np.std(np.log(image[mask]) - np.log(reference[mask])))


def test_a_smooth_multiplicative_field_is_mostly_removed(phantom_image):
    brain = brain_mask(phantom_image)
    rng = np.random.default_rng(0)
    biased = phantom_image.copy()
    for c in range(len(biased)):
        biased[c] = np.where(brain, biased[c] * np.exp(0.4 * _smooth_field(rng, biased.shape[1:], 3)), 0)
    corrected = correct_bias(biased, [m.value for m in MODALITY_ORDER])
    assert corrected.warnings == []
    left = []
    for c in range(len(biased)):
        mask = brain & (phantom_image[c] > 0)
        before = _log_spread(biased[c], phantom_image[c], mask)
        left.append(_log_spread(corrected.image[c], phantom_image[c], mask) / before)
    # N4 also flattens some true tissue contrast, which counts as residue here (on three generator-2.2
    # phantoms 21-61% of the spread is left per modality): so the field must be more than halved on
    # average over the modalities and cut by a third in every one.
    assert np.mean(left) < 0.5 and max(left) < 2 / 3, dict(zip(MODALITY_ORDER, left))


def test_images_normalised_before_they_reach_us_are_corrected_as_the_raw_ones_are(phantom_image):
    """Z-scored modalities (half the brain negative) are lifted to positive before N4, which fits log
    intensities: the biased phantom, z-scored, comes out as close to the unbiased one as its raw version
    does (Pearson r inside the brain; without the lift N4 fitted only the positive half and left most of the
    field), and every brain voxel is positive; a few negative voxels at a raw image's edge are left alone."""
    brain = brain_mask(phantom_image)
    rng = np.random.default_rng(1)
    biased = phantom_image.copy()
    for c in range(len(biased)):
        biased[c] = np.where(brain, biased[c] * np.exp(0.4 * _smooth_field(rng, biased.shape[1:], 3)), 0)
    scored = biased.copy()
    for c in range(len(scored)):
        values = scored[c][brain]
        scored[c][brain] = (values - values.mean()) / values.std()
    from_scores, from_raw = correct_bias(scored).image, correct_bias(biased).image

    def r(image: np.ndarray, c: int) -> float:
        return float(np.corrcoef(image[c][brain], phantom_image[c][brain])[0, 1])

    for c in range(len(scored)):
        assert r(from_scores, c) > r(scored, c) + 0.1 and r(from_scores, c) > r(from_raw, c) - 0.05, MODALITY_ORDER[c]
        assert (from_scores[c][brain] > 0).all()
    ringing = biased.copy()
    edge = tuple(np.argwhere(brain & ~np.roll(brain, 1, axis=0))[:500].T)  # 500 voxels: 0.5% of this brain
    ringing[0][edge] = -1.0
    assert (correct_bias(ringing).image[0][edge] == -1.0).all()


def test_the_correction_is_the_same_whatever_the_threads_and_workers(phantom_image):
    """N4 split over ITK's threads fits a slightly different field per thread count, so a case's labels
    depended on the machine's cores: every fit now runs single-threaded, whatever SimpleITK's default was
    before, and the modalities fitted one at a time or concurrently give the same bytes."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)
        one_at_a_time = correct_bias(phantom_image, workers=1).image
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
        concurrent = correct_bias(phantom_image, workers=4).image
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    assert np.array_equal(one_at_a_time, concurrent)
    with pytest.raises(ValueError, match="workers"):
        correct_bias(phantom_image, workers=0)


def test_the_field_is_fitted_outside_the_excluded_tumour(phantom_image):
    """What lies inside ``exclude`` does not move the field: two cases that differ only there (a lesion
    three times as bright, as edema is on FLAIR) are corrected identically everywhere else, and the
    lesion itself is still corrected (divided by the field, not left out)."""
    brain = brain_mask(phantom_image)
    depth, height, width = phantom_image.shape[1:]
    z, y, x = np.ogrid[:depth, :height, :width]
    lesion = ((z - depth // 2) ** 2 + (y - height // 2) ** 2 + (x - width // 3) ** 2 <= 12**2) & brain
    bright = phantom_image.copy()
    bright[:, lesion] *= 3.0
    plain = correct_bias(phantom_image, exclude=lesion).image
    with_lesion = correct_bias(bright, exclude=lesion).image
    np.testing.assert_allclose(with_lesion[:, ~lesion], plain[:, ~lesion], rtol=1e-4)
    np.testing.assert_allclose(with_lesion[:, lesion], 3.0 * plain[:, lesion], rtol=1e-4)
    unexcluded = correct_bias(bright).image
    assert not np.allclose(unexcluded[:, ~lesion], plain[:, ~lesion], rtol=1e-4)


def test_background_and_non_positive_voxels_keep_their_values(phantom_image):
    image = phantom_image.copy()
    image[0, 30:34, 40:44, 20:24] = -5.0  # inside the brain, not positive
    original = image.copy()
    corrected = correct_bias(image)
    np.testing.assert_array_equal(image, original)  # the input is not modified
    assert corrected.image.dtype == np.float32 and corrected.image.shape == image.shape
    outside = ~brain_mask(image)
    assert np.all(corrected.image[:, outside] == 0)
    assert np.all(corrected.image[0, 30:34, 40:44, 20:24] == -5.0)
    assert np.all(corrected.image[image > 0] > 0)


def test_a_modality_too_sparse_to_fit_is_left_alone_with_a_warning_naming_it(phantom_image):
    image = phantom_image.copy()
    t1 = MODALITY_ORDER.index(Modality.T1)
    image[t1] = 0
    image[t1, 40:45, 40:45, 30:32] = 100.0
    corrected = correct_bias(image, [m.value for m in MODALITY_ORDER])
    [warning] = corrected.warnings
    assert warning.code is WarningCode.BIAS_CORRECTION_SKIPPED
    assert warning.message.startswith("bias correction skipped for t1:")
    np.testing.assert_array_equal(corrected.image[t1], image[t1])


def test_invalid_inputs_are_value_errors(phantom_image):
    with pytest.raises(ValueError, match="expected"):
        correct_bias(phantom_image[0])
    with pytest.raises(ValueError, match="modality names"):
        correct_bias(phantom_image, ["flair"])
    with pytest.raises(ValueError, match="exclude mask"):
        correct_bias(phantom_image, exclude=np.zeros((4, 4, 4), bool))
    assert correct_bias(np.zeros((4, 8, 8, 8), np.float32)).warnings == []


def test_a_brain_gets_the_same_field_whatever_background_is_stored_around_it(phantom_image):
    """N4's shrunk grid starts at the corner of the brain's box grown by its margin: a case cut to its
    brain's bounding box (as some preprocessed datasets store it) is padded back to that margin for the fit,
    so it is corrected exactly as the same brain with background around it, voxel for voxel; so is the brain
    with the background below it cut off, reaching the volume's first face."""
    box = bounding_box(brain_mask(phantom_image))
    assert all(s.start >= 2 and s.stop <= n - 2 for s, n in zip(box, phantom_image.shape[1:]))
    whole = correct_bias(phantom_image).image
    cut = correct_bias(phantom_image[(slice(None), *box)]).image
    np.testing.assert_array_equal(cut, whole[(slice(None), *box)])
    low = slice(box[0].start, None)  # the brain's lowest slice on the volume's first face
    np.testing.assert_array_equal(correct_bias(phantom_image[:, low]).image, whole[:, low])
    assert clipped_margin(brain_mask(phantom_image[:, low]), 2) == ((2, 0), (0, 0), (0, 0))
    assert clipped_margin(brain_mask(phantom_image), 2) == ((0, 0),) * 3


def test_a_case_cut_to_its_brain_gets_the_labels_of_its_uncut_volume(tmp_path):
    """Through the CLI with N4 (the default): a case whose four files are cut to the brain's bounding box
    (ITK keeps each voxel's position) gets, voxel for voxel, the labels the uncut case gets there, and the
    uncut case has none outside it. (Random weights whose labels move with the field: cut, before the fit
    was padded, 15,266 voxels differed; width 4 and seeds 0 and 2 at width 8 label the same voxels either way.)"""
    weights = random_weights(tmp_path / "w", width=8, folds=1, seed=1)
    (case,) = small_cases(tmp_path / "in", 1, size=SIZE)
    files = sorted(f for f in case.glob("*.nii.gz") if not f.name.endswith("seg.nii.gz"))
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in files]
    box = bounding_box(np.any(np.stack(arrays) != 0, axis=0))  # (z, y, x): ITK slices (x, y, z)
    cut = tmp_path / "cut" / case.name
    cut.mkdir(parents=True)
    for f in files:
        sitk.WriteImage(sitk.ReadImage(str(f))[box[2], box[1], box[0]], str(cut / f.name))
    for folder in ("in", "cut"):
        result = run_cli("--input", str(tmp_path / folder), "--output", str(tmp_path / f"out_{folder}"),
                         "--weights", str(weights))
        assert result.returncode == 0, result.stderr
    whole, = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in (tmp_path / "out_in").iterdir()]
    from_cut, = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in (tmp_path / "out_cut").iterdir()]
    assert whole[box].any()
    np.testing.assert_array_equal(from_cut, whole[box])
    assert whole.sum() == whole[box].sum()


def test_shrink_keeps_the_fitted_grid_usable():
    assert n4_shrink_factor((155, 240, 240)) == 8
    assert n4_shrink_factor((48, 64, 64)) == 3
    assert n4_shrink_factor((10, 64, 64)) == 1


def test_segment_image_reads_the_corrected_image_everywhere(tmp_path, phantom_image):
    """With N4 on (the default), the network and the post-processing both see the case corrected outside the
    scout's tumour: the same labels as correcting so by hand and segmenting without it."""
    _, models = load_ensemble(random_weights(tmp_path / "w", folds=1))
    predictor = EnsemblePredictor(device="cpu").load_models(models)
    with_n4 = segment_image(predictor, phantom_image, PostprocessConfig())  # the default
    assert "bias_correction" in with_n4.timings
    scout = predictor.scout_tumour(phantom_image)
    assert scout.shape == phantom_image.shape[1:] and scout.dtype == bool
    corrected = correct_bias(phantom_image, exclude=scout).image
    by_hand = segment_image(predictor, corrected, PostprocessConfig(), bias_correction=BiasCorrection.NONE)
    np.testing.assert_array_equal(with_n4.labels, by_hand.labels)


def test_the_scout_does_not_depend_on_the_tiling(tmp_path, phantom_image):
    """The tiling knob changes the final pass only: `fast` and `paper` correct a case with the same scout
    (each running its own tiling's scout, these weights' masks differed by 1,512 voxels)."""
    _, models = load_ensemble(random_weights(tmp_path / "w", folds=2))
    fast = EnsemblePredictor(device="cpu").load_models(models)
    paper = EnsemblePredictor(device="cpu", tiling="paper").load_models(models)
    scout = fast.scout_tumour(phantom_image)
    assert 0 < scout.sum() < scout.size
    np.testing.assert_array_equal(paper.scout_tumour(phantom_image), scout)


def test_the_scout_keeps_a_core_it_encloses_out_of_the_fit():
    """A core the network reads as brain, inside a ring of edema wider than the dilation reaches across, is
    a hole of the scout in a slice: it joins the scout (N4 would flatten it otherwise). Brain outside the
    tumour's reach and voxels outside the brain stay out."""
    z, y, x = np.indices((24, 48, 48))
    r = np.hypot(y - 24, x - 24)
    ring = (r >= SCOUT_DILATION + 6) & (r < SCOUT_DILATION + 10) & (z > 4) & (z < 20)  # a tube, open at both ends
    brain = np.ones(ring.shape, bool)
    brain[:, :, :2] = False
    mask = scout_mask(ring, brain)
    assert mask[12, 24, 24] and mask[ring].all()  # the centre, SCOUT_DILATION + 6 voxels from the tube
    assert not mask[12, 2, 24] and not mask[:, :, :2].any()
    assert not scout_mask(np.zeros_like(ring), brain).any()
    with pytest.raises(ValueError, match="differ in shape"):
        scout_mask(ring, brain[:-1])


def test_run_sh_with_n4_and_the_mlcube_parameter(tmp_path):
    weights = random_weights(tmp_path / "w", folds=1)
    small_cases(tmp_path / "in", 2)
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
                     "--bias-correction", "n4")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(": ok ") == 2 and len(list((tmp_path / "out").iterdir())) == 2
    params = tmp_path / "parameters.yaml"
    params.write_text("bias_correction: n4\n")
    infer = run_cli("infer", f"--data_path={tmp_path / 'in'}", f"--output_path={tmp_path / 'preds'}",
                    f"--parameters_file={params}", "--weights", str(weights))
    assert infer.returncode == 0, infer.stderr
    assert len(list((tmp_path / "preds").iterdir())) == 2
    params.write_text("bias_correction: n5\n")
    bad = run_cli("infer", f"--data_path={tmp_path / 'in'}", f"--output_path={tmp_path / 'p2'}",
                  f"--parameters_file={params}", "--weights", str(weights))
    assert bad.returncode == 2 and "--bias-correction" in bad.stderr
