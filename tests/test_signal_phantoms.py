"""The evaluation-only signal-equation phantoms: independent of app, deterministic, BraTS 2021 files that
the product reads as it reads real cases."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "signal_phantoms.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import signal_phantoms  # noqa: E402

SMALL = (96, 96, 64)


def test_the_generator_shares_no_code_with_the_product():
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported, "the parse found no imports at all"
    assert "app" not in imported and "" not in imported


def test_cases_are_deterministic_per_seed_and_index_and_differ_between_them():
    first, again = signal_phantoms.make_case(3, 0, SMALL), signal_phantoms.make_case(3, 0, SMALL)
    other = signal_phantoms.make_case(3, 1, SMALL)
    assert first.case_id == "BraTS2021_03000" and other.case_id == "BraTS2021_03001"
    np.testing.assert_array_equal(first.labels, again.labels)
    for name in ("flair", "t1", "t1c", "t2"):
        np.testing.assert_array_equal(first.images[name], again.images[name])
    assert not np.array_equal(first.images["flair"], other.images["flair"])


def test_cases_hold_a_tumour_inside_a_skull_stripped_brain_with_mri_contrasts():
    for index in range(3):
        case = signal_phantoms.make_case(5, index, SMALL)
        labels = case.labels
        assert labels.shape == (SMALL[2], SMALL[1], SMALL[0])
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4} and (labels > 0).any()
        brain = case.images["t1"] > 0
        assert brain.mean() > 0.1 and not (labels > 0)[~brain].any()  # the tumour lies in the brain
        for name, image in case.images.items():
            assert image.dtype in (np.int16, np.float32), name
            assert (image[~brain] == 0).all(), name
        normal = brain & (labels == 0)
        edema = labels == 2
        if edema.sum() > 50:  # edema is brighter than normal brain on T2 (water)
            assert np.median(case.images["t2"][edema]) > np.median(case.images["t2"][normal])
        enhancing = labels == 4
        if enhancing.sum() > 50:  # gadolinium: enhancing tumour is brighter on T1c than on T1, relative to brain
            t1c = np.median(case.images["t1c"][enhancing]) / np.median(case.images["t1c"][normal])
            t1 = np.median(case.images["t1"][enhancing]) / np.median(case.images["t1"][normal])
            assert t1c > 1.2 * t1


def test_the_script_writes_brats_2021_cases_the_product_reads(tmp_path):
    from app.conventions import from_file_labels
    from app.io import find_cases, load_case, load_segmentation

    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--n", "2", "--seed", "4",
                           "--size", ",".join(map(str, SMALL))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = find_cases(tmp_path)
    assert not found.errors and [c.case_id for c in found.cases] == ["BraTS2021_04000", "BraTS2021_04001"]
    for case in found.cases:
        assert sorted(p.name for p in case.segmentation.parent.iterdir()) == sorted(
            f"{case.case_id}_{t}.nii.gz" for t in ("flair", "t1", "t1ce", "t2", "seg"))
        loaded = load_case(case)
        assert loaded.image.shape[0] == 4
        assert loaded.reference.GetDirection() == signal_phantoms.DIRECTION
        truth = from_file_labels(load_segmentation(case, loaded.reference))
        expected = signal_phantoms.make_case(4, int(case.case_id[-3:]), SMALL).labels
        np.testing.assert_array_equal(truth > 0, expected > 0)
    refused = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--seed", "100"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--seed must be 0-99" in refused.stderr


def test_train_reads_a_brats_2021_folder_whose_enhancing_tumour_is_labelled_4(tmp_path):
    """The training path on BraTS 2021 files as the challenge distributes them (int16 or float32, LPS, ET = 4):
    the prepared target holds the enhancing class where the file says 4, and `train --data` runs on the folder."""
    import json

    from app.conventions import ENHANCING
    from app.io import cases_with_ground_truth
    from app.train import prepare_case

    from .helpers import python_cli

    data = tmp_path / "data"
    truth = {}
    for index in range(3):
        case = signal_phantoms.make_case(8, index, SMALL)
        signal_phantoms.write_case(case, data)
        truth[case.case_id] = case.labels
    with_et = [c for c in cases_with_ground_truth(data) if (truth[c.case_id] == 4).any()]
    assert with_et, "no case of the series has an enhancing tumour"
    prepared = prepare_case(with_et[0])
    assert int((np.asarray(prepared.target) == ENHANCING).sum()) == int((truth[with_et[0].case_id] == 4).sum())
    out = tmp_path / "weights"
    result = python_cli("train", "--data", str(data), "--out", str(out), "--width", "4", "--folds", "3", "--fold", "0",
                        "--stage-steps", "1,1,2", "--batch", "2", "--validate-every", "4", "--quiet", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["data"]["cases"] == 3 and [f["fold"] for f in manifest["folds"]] == [0]
