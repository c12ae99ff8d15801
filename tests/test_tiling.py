"""`fast` tiling must agree with the paper's overlap-tile (issue 6: Dice >= 0.97 on every region)."""

import numpy as np
import pytest
import torch

from app.conventions import MODALITY_ORDER
from app.inference import EnsemblePredictor
from app.metrics import region_dice
from app.phantoms import make_phantom
from app.postprocess import postprocess
from app.weights import DEFAULT_WEIGHTS_DIR, load_ensemble

AGREEMENT = 0.97


@pytest.fixture(scope="module")
def shipped_fold():
    if not (DEFAULT_WEIGHTS_DIR / "manifest.json").is_file():
        pytest.fail("the shipped weights (weights/manifest.json) are missing")
    _, models = load_ensemble(DEFAULT_WEIGHTS_DIR, folds=None)
    return models[:1]


def test_fast_and_paper_tilings_agree(shipped_fold):
    torch.set_num_threads(2)
    phantom = make_phantom(61, 0, (120, 136, 96))
    image = np.stack([phantom.images[m].astype(np.float32) for m in MODALITY_ORDER])
    t1c = image[MODALITY_ORDER.index(next(m for m in MODALITY_ORDER if m.value == "t1c"))]
    masks = {}
    for tiling in ("fast", "paper"):
        labels = EnsemblePredictor(device="cpu", tiling=tiling).load_models(shipped_fold).predict_labels(image)
        masks[tiling] = postprocess(labels, t1c)
    assert masks["fast"].any(), "the shipped fold found no tumour on the phantom"
    agreement = region_dice(masks["fast"], masks["paper"])
    assert min(agreement.values()) >= AGREEMENT, agreement
