import json
from dataclasses import replace

import numpy as np
import pytest

from app.case_warnings import CaseWarning, WarningCode
from app.confidence import (
    DRAWN_CORE_WARNING,
    EMPTY_REGION_VOXELS,
    FAR_EDEMA_MM,
    FAR_EDEMA_SHARE,
    FAR_EDEMA_WARNING,
    LOW_CONFIDENCE,
    LOW_CONFIDENCE_WARNING,
    case_confidence,
    confidence_warnings,
    dismissed_blobs,
    drawn_core_share,
    expected_dice,
    far_edema_share,
)
from app.fusion import TaskProbabilities
from app.inference import CasePrediction
from app.io import find_cases, load_case
from app.options import BiasCorrection
from app.pipeline import CaseRunner, PredictOptions, segment_image
from app.postprocess import PostprocessConfig

from .helpers import random_weights, run_cli, small_cases

SHAPE = (12, 16, 16)


def _far(share: float) -> CaseWarning:
    return CaseWarning(WarningCode.FAR_EDEMA, FAR_EDEMA_WARNING.format(mm=FAR_EDEMA_MM, share=share))


def _probabilities(labels: np.ndarray, certainty: float) -> TaskProbabilities:
    """Task probabilities that put ``certainty`` on the true class of every voxel, the rest on brain."""
    classes = np.zeros((5, *labels.shape), np.float32)
    for c in range(5):
        target = labels == c if c else np.zeros(labels.shape, bool)
        classes[c][target] = certainty
    classes[4] += 1 - classes.sum(0)
    enhancing = np.where(labels == 3, certainty, 1 - certainty).astype(np.float32)
    return TaskProbabilities(tumour=(labels > 0) * certainty, classes=classes, enhancing=enhancing)


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:10, 3:13, 3:13] = 2
    labels[4:8, 5:11, 5:11] = 1
    labels[5:7, 6:10, 6:10] = 3
    return labels


def test_certain_probabilities_give_full_confidence_and_doubt_lowers_it():
    labels = _labels()
    sure = expected_dice(_probabilities(labels, 1.0), labels)
    assert all(abs(v - 1.0) < 1e-6 for v in sure.values()), sure
    unsure = expected_dice(_probabilities(labels, 0.55), labels)
    assert all(v < 0.8 for v in unsure.values()), unsure
    assert case_confidence(unsure) < LOW_CONFIDENCE <= case_confidence(sure)


def test_an_empty_prediction_with_nothing_probable_is_confident():
    labels = np.zeros(SHAPE, np.uint8)
    empty = expected_dice(_probabilities(labels, 1.0), labels)
    assert empty == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


def test_an_empty_mask_scores_the_chance_that_the_region_is_absent():
    labels = _labels()
    labels[labels == 3] = 1  # ET relabelled NCR, as post-processing step 3 does
    p = _probabilities(_labels(), 1.0)
    p.enhancing[:] = 0.0
    p.enhancing[5, 6:9, 6:11] = 0.5  # 7.5 expected ET voxels inside the core: a doubt, not an ET
    assert expected_dice(p, labels)["ET"] == pytest.approx(1.0 - 7.5 / EMPTY_REGION_VOXELS)
    p.classes[1][labels > 0] = 0.9
    p.enhancing[labels > 0] = 0.9  # 648 expected ET voxels, over the smallest ET kept: likely wrong
    assert expected_dice(p, labels)["ET"] == 0.0


def test_probability_outside_the_mask_lowers_confidence():
    labels = _labels()
    p = _probabilities(labels, 1.0)
    p.classes[2][0:2] = 0.6  # a slab of probable edema the mask left out
    p.classes[4][0:2] = 0.4
    assert expected_dice(p, labels)["WT"] < 0.9


class _FixedPredictor:
    """Stands in for the ensemble: returns the truth as labels with probabilities of a chosen certainty."""

    def __init__(self, certainty: float):
        self.certainty = certainty

    def predict_case(self, image, progress=None):
        labels = self.labels(image.shape[1:])
        box = tuple(slice(0, n) for n in labels.shape)
        return CasePrediction(labels, box, _probabilities(labels, self.certainty), None)

    def labels(self, shape) -> np.ndarray:
        labels = np.zeros(shape, np.uint8)
        labels[10:20, 20:40, 20:40] = 2
        labels[13:17, 25:35, 25:35] = 1
        return labels


def test_drawn_core_share_counts_core_the_network_did_not_call():
    fused = _labels()
    assert drawn_core_share(fused, fused) == 0.0
    assert drawn_core_share(np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)) == 0.0
    final = fused.copy()
    final[fused == 3] = 1  # step 3: ET relabelled NCR is still the network's core
    assert drawn_core_share(fused, final) == 0.0
    final[2:10, 3:13, 3:5] = 1  # edema relabelled NCR, as step 2 does: 160 voxels of new core
    core = int(((final == 1) | (final == 3)).sum())
    assert drawn_core_share(fused, final) == pytest.approx(160 / core)


def test_confidence_warnings_name_a_drawn_core_only_when_the_case_is_flagged():
    assert confidence_warnings(None, 1.0) == []
    assert confidence_warnings(LOW_CONFIDENCE, 1.0) == []
    assert confidence_warnings(LOW_CONFIDENCE - 0.01, 0.3) == [LOW_CONFIDENCE_WARNING]
    assert confidence_warnings(LOW_CONFIDENCE - 0.01, 0.8) == [LOW_CONFIDENCE_WARNING, DRAWN_CORE_WARNING]


def test_far_edema_share_measures_edema_beyond_the_distance_in_mm_from_the_core():
    labels = np.zeros((8, 80, 8), np.uint8)
    assert far_edema_share(labels) == 0.0  # no edema
    labels[:, 10:70] = 2
    assert far_edema_share(labels) == 1.0  # edema without a core
    labels[:, 0:10] = 1
    # Edema rows 10..69; a row is farther than 25 mm from the core (last row 9) from row 35 on: 35 of 60 rows.
    assert far_edema_share(labels) == pytest.approx(35 / 60)
    assert far_edema_share(labels, spacing=(1.0, 0.5, 1.0)) == pytest.approx(10 / 60)  # rows 0.5 mm apart
    labels[:, 8:10] = 3  # ET is core too
    assert far_edema_share(labels) == pytest.approx(35 / 60)
    labels[:, 50:] = 0
    assert far_edema_share(labels) < FAR_EDEMA_SHARE


def test_far_edema_flags_a_confident_case_and_says_why():
    far = FAR_EDEMA_SHARE + 0.1
    assert confidence_warnings(0.95, 0.0, FAR_EDEMA_SHARE) == []
    assert confidence_warnings(0.95, 0.9, far) == [LOW_CONFIDENCE_WARNING,
                                                   _far(far)]
    assert confidence_warnings(None, 0.0, far)[0] == LOW_CONFIDENCE_WARNING
    assert confidence_warnings(LOW_CONFIDENCE - 0.01, 0.8, far)[-1] == DRAWN_CORE_WARNING


class _HollowCorePredictor(_FixedPredictor):
    """A one-voxel shell of NCR/NET around edema: post-processing step 4 fills the centre with core the
    network did not call, two thirds of the final core."""

    def labels(self, shape) -> np.ndarray:
        labels = np.zeros(shape, np.uint8)
        labels[8:24, 16:44, 16:44] = 2
        labels[10:22, 20:40, 20:40] = 1
        labels[11:21, 21:39, 21:39] = 2
        return labels


class _FarEdemaPredictor(_FixedPredictor):
    """A small core at one side and a band of edema reaching over 25 mm away from it, called with certainty
    (as the ensemble calls bright grey matter edema)."""

    def labels(self, shape) -> np.ndarray:
        labels = np.zeros(shape, np.uint8)
        labels[20:28, 2:8, 28:36] = 1
        labels[20:28, 8:62, 28:36] = 2
        return labels


def test_low_confidence_warns_in_the_case_line_and_report(tmp_path):
    small_cases(tmp_path / "in", 1)
    [case] = find_cases(tmp_path / "in").cases
    loaded = load_case(case)
    # The stand-in has no tumour scout, so bias correction (which needs one) is off here.
    options = PredictOptions(tmp_path / "in", tmp_path / "out", postprocess=PostprocessConfig.off(),
                             bias_correction=BiasCorrection.NONE)
    (tmp_path / "out").mkdir()
    confident = CaseRunner(_FixedPredictor(0.99), options).run(loaded)
    doubtful = CaseRunner(_FixedPredictor(0.5), options).run(loaded)
    assert confident.confidence > LOW_CONFIDENCE and LOW_CONFIDENCE_WARNING not in confident.warnings
    assert doubtful.confidence < LOW_CONFIDENCE and LOW_CONFIDENCE_WARNING in doubtful.warnings
    assert set(doubtful.expected_dice) == {"WT", "TC", "ET"}
    assert DRAWN_CORE_WARNING not in doubtful.warnings  # its core is the network's own
    filling = replace(options, postprocess=replace(PostprocessConfig.off(), fill_enclosed_core=True))
    drawn = CaseRunner(_HollowCorePredictor(0.5), filling).run(loaded)
    assert drawn.warnings[-2:] == [LOW_CONFIDENCE_WARNING, DRAWN_CORE_WARNING]
    assert drawn.drawn_core_share > 0.5 and doubtful.drawn_core_share == 0.0
    assert CaseRunner(_HollowCorePredictor(0.5), options).run(loaded).warnings[-1] == LOW_CONFIDENCE_WARNING
    assert confident.far_edema_share == 0.0
    far = CaseRunner(_FarEdemaPredictor(0.99), options).run(loaded)
    assert far.confidence > LOW_CONFIDENCE and far.far_edema_share > FAR_EDEMA_SHARE
    assert far.warnings[-2:] == [LOW_CONFIDENCE_WARNING,
                                 _far(far.far_edema_share)]


def test_predict_prints_and_reports_a_confidence_per_case(tmp_path):
    weights = random_weights(tmp_path / "weights", folds=2)
    small_cases(tmp_path / "in", 1)
    report = tmp_path / "report.json"
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
                     "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert ", confidence " in result.stderr
    [row] = json.loads(report.read_text())["cases"]
    assert 0.0 <= row["confidence"] <= 1.0 and set(row["expected_dice"]) == {"WT", "TC", "ET"}
    assert 0.0 <= row["drawn_core_share"] <= 1.0 and 0.0 <= row["far_edema_share"] <= 1.0


def test_segment_image_measures_far_edema_in_the_spacing_given(tmp_path):
    """The benchmarks' path (`segment_image`) reports the far-edema share and its warning as the CLI does."""
    small_cases(tmp_path / "in", 1)
    image = load_case(find_cases(tmp_path / "in").cases[0]).image
    far = segment_image(_FarEdemaPredictor(0.99), image, PostprocessConfig.off(), bias_correction=BiasCorrection.NONE)
    assert far.far_edema_share == far_edema_share(far.labels) > FAR_EDEMA_SHARE
    assert far.warnings[-2:] == [LOW_CONFIDENCE_WARNING,
                                 _far(far.far_edema_share)]
    # Rows 0.3 mm apart: the band's far end is 16 mm from the core.
    near = segment_image(_FarEdemaPredictor(0.99), image, PostprocessConfig.off(), bias_correction=BiasCorrection.NONE,
                         spacing=(1.0, 0.3, 1.0))
    assert near.far_edema_share == 0.0 and near.warnings == []


class _DoubtfulBlobPredictor(_FixedPredictor):
    """The tumour of `_FixedPredictor` at ``certainty`` and, far from it, a blob of edema the ensemble called
    with task-1 probability 0.3 (as it calls bright cortex): post-processing step 5 removes the blob."""

    def predict_case(self, image, progress=None):
        prediction = super().predict_case(image, progress)
        blob = (slice(10, 20), slice(2, 12), slice(44, 60))
        prediction.labels[blob] = 2
        p = prediction.probabilities
        p.tumour[blob] = 0.3
        p.classes[:, blob[0], blob[1], blob[2]] = 0.0
        p.classes[2][blob] = 0.45
        p.classes[4][blob] = 0.55
        prediction.region = np.ones(prediction.labels.shape, bool)  # task 2 decided there too
        return prediction


def test_the_probability_of_a_removed_blob_does_not_count_where_a_kept_tumour_is_sure(tmp_path):
    small_cases(tmp_path / "in", 1)
    image = load_case(find_cases(tmp_path / "in").cases[0]).image
    step5 = replace(PostprocessConfig.off(), drop_doubtful_components=True)
    sure = segment_image(_DoubtfulBlobPredictor(0.99), image, step5, bias_correction=BiasCorrection.NONE)
    clean = segment_image(_FixedPredictor(0.99), image, step5, bias_correction=BiasCorrection.NONE)
    assert not (sure.labels[10:20, 2:12, 44:60] > 0).any()  # step 5 removed the blob
    assert sure.expected_dice == clean.expected_dice and LOW_CONFIDENCE_WARNING not in sure.warnings
    # Read as before, the blob's probability counted as tumour the mask missed.
    counted = expected_dice(sure.probabilities, sure.labels[sure.box], np.ones(sure.labels.shape, bool))
    assert counted["WT"] < sure.expected_dice["WT"] - 0.05
    # No kept component is sure (mean task-1 probability 0.45): the removed blob may be the tumour, and counts.
    unsure = segment_image(_DoubtfulBlobPredictor(0.45), image, step5, bias_correction=BiasCorrection.NONE)
    assert not (unsure.labels[10:20, 2:12, 44:60] > 0).any()
    region = np.ones(unsure.labels.shape, bool)
    assert unsure.expected_dice == {k: round(v, 4) for k, v in
                                    expected_dice(unsure.probabilities, unsure.labels[unsure.box], region).items()}


def test_dismissed_blobs_take_the_removed_tumour_with_its_halo_and_nothing_kept():
    labels = _labels()
    p = _probabilities(labels, 1.0)
    fused = labels.copy()
    fused[0:2, 0:2, 0:2] = 2  # a blob the network called, post-processing removed
    p.classes[2][0:2, 0:2, 0:3] = 0.4  # with a halo of doubt beside it, apart from the kept tumour
    p.tumour[0:2, 0:2, 0:2] = 0.3
    dismissed = dismissed_blobs(p, fused, labels, np.ones(SHAPE, bool))
    assert dismissed[0:2, 0:2, 0:3].all() and not (dismissed & (labels > 0)).any()
    assert not dismissed_blobs(p, labels, labels).any()  # nothing removed, nothing dismissed
    edema_only = np.where(labels > 0, 2, 0).astype(np.uint8)  # a kept tumour without a core is no proof
    assert not dismissed_blobs(p, np.maximum(fused, edema_only), edema_only, np.ones(SHAPE, bool)).any()
