"""`fast` tiling against the paper's overlap-tile on shipped weights (one fold, a small phantom).

These check behaviour, not the numbers of one set of weights: the fast tiling must find the tumour the paper
tiling finds and be as accurate against the truth (within a slack that covers a briefly trained fold's
voxel-level wobble), and bf16 arithmetic must give nearly the masks fp32 gives. Agreement figures of the
whole ensemble are in the README (Speed), measured by benchmarks/benchmark.py and benchmarks/agreement.py.
"""

import numpy as np
import pytest
import torch

from app.conventions import MODALITY_ORDER, Modality
from app.inference import EnsemblePredictor, Precision, native_bf16
from app.metrics import region_dice
from app.phantoms import make_phantom
from app.postprocess import postprocess
from app.weights import DEFAULT_WEIGHTS_DIR, load_ensemble
from tests.helpers import random_weights

pytestmark = pytest.mark.slow  # `./tests/run_tests.sh -m "not slow"` for a quick loop

ACCURACY_SLACK = 0.05
BF16_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def shipped_fold():
    if not (DEFAULT_WEIGHTS_DIR / "manifest.json").is_file():
        pytest.fail("the shipped weights (weights/manifest.json) are missing")
    _, models = load_ensemble(DEFAULT_WEIGHTS_DIR, folds=[0])
    return models


@pytest.fixture(scope="module")
def small_phantom():
    phantom = make_phantom(61, 0, (120, 136, 96))
    return phantom, np.stack([phantom.images[m].astype(np.float32) for m in MODALITY_ORDER])


def test_fast_and_paper_tilings_agree(shipped_fold, small_phantom):
    torch.set_num_threads(2)
    phantom, image = small_phantom
    t1c = image[MODALITY_ORDER.index(Modality.T1C)]
    masks = {}
    for tiling in ("fast", "paper"):
        prediction = EnsemblePredictor(device="cpu", tiling=tiling).load_models(shipped_fold).predict_case(image)
        masks[tiling] = postprocess(prediction.labels, t1c, tumour_probability=prediction.tumour_probability(),
                                    t1=image[MODALITY_ORDER.index(Modality.T1)])
    assert masks["fast"].any() and masks["paper"].any(), "a tiling found no tumour on the phantom"
    assert region_dice(masks["fast"], masks["paper"])["WT"] > 0.5, "the tilings found different tumours"
    fast, paper = region_dice(masks["fast"], phantom.labels), region_dice(masks["paper"], phantom.labels)
    assert all(fast[r] >= paper[r] - ACCURACY_SLACK for r in fast), (fast, paper)


def test_bf16_arithmetic_agrees_with_fp32(shipped_fold, small_phantom):
    """`--precision auto` picks bf16 on CPUs with native bf16; its masks must match fp32's closely."""
    torch.set_num_threads(2)
    _, image = small_phantom
    masks = {}
    for precision in ("fp32", "bf16"):
        predictor = EnsemblePredictor(device="cpu", precision=precision).load_models(shipped_fold)
        assert predictor.precision is Precision(precision)
        masks[precision] = predictor.predict_labels(image)
    assert masks["fp32"].any()
    agreement = region_dice(masks["bf16"], masks["fp32"])
    assert all(v >= BF16_AGREEMENT for v in agreement.values()), agreement


def test_precision_option_is_validated():
    with pytest.raises(ValueError, match=r"precision must be one of \[.auto., .fp32., .bf16.\]"):
        EnsemblePredictor(device="cpu", precision="fp16")
    auto = EnsemblePredictor(device="cpu").precision
    assert auto is (Precision.BF16 if native_bf16(torch.device("cpu")) else Precision.FP32)


def test_fp32_means_ieee_convolutions_not_tf32(tmp_path):
    """cuDNN runs fp32 convolutions as TF32 unless told otherwise: `--precision fp32` (the reference) must
    run the network with IEEE fp32 convolutions, and leave the process's setting as it found it."""
    seen = []
    predictor = EnsemblePredictor(device="cpu", precision="fp32", max_tile=(16, 24, 24))
    predictor.load_models(load_ensemble(random_weights(tmp_path / "w", folds=1))[1])
    predictor.models[0].register_forward_pre_hook(lambda *_: seen.append(torch.backends.cudnn.conv.fp32_precision))
    before = torch.backends.cudnn.conv.fp32_precision
    predictor.predict_probabilities(np.random.default_rng(0).normal(size=(4, 16, 24, 24)).astype(np.float32))
    assert seen and set(seen) == {"ieee"}
    assert torch.backends.cudnn.conv.fp32_precision == before
