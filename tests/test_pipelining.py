"""Predict's overlapped stages and its answers to a device that runs out of memory, driven on the CPU.

Out-of-memory errors are injected where CUDA would raise them (the ensemble's per-batch reduction); the
stages' overlap is observed by making a case's finishing wait for the next case's prediction to start.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.inference import CPU_FALLBACK_WARNING, EnsemblePredictor, ieee_fp32
from app.io import find_cases, load_case
from app.pipeline import CaseRunner, CaseStatus, PredictOptions, run_predict
from app.postprocess import PostprocessConfig
from app.weights import load_ensemble
from tests.helpers import random_weights, small_cases

OPTIONS = {"device": "cpu", "precision": "fp32", "max_tile": (16, 24, 24)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_ensemble(random_weights(tmp_path_factory.mktemp("weights"), folds=2))[1]


def _inject_out_of_memory(predictor: EnsemblePredictor, above: int, calls: list[int]) -> None:
    """Make the predictor's device 'run out of memory' for batches of more than ``above`` tiles."""
    real = predictor.runner.reduce

    def reduce(model, x):
        calls.append(len(x))
        if len(x) > above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, x)

    predictor.runner.reduce = reduce


def _assert_same_label_maps(folder, reference):
    names = sorted(p.name for p in reference.iterdir())
    assert names and names == sorted(p.name for p in folder.iterdir())
    for name in names:
        got, want = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / name))) for f in (folder, reference))
        np.testing.assert_array_equal(got, want)


def test_out_of_memory_halves_the_tile_batch_and_keeps_the_answer(models):
    image = np.random.default_rng(0).normal(size=(4, 30, 50, 44)).astype(np.float32)
    reference = EnsemblePredictor(**OPTIONS).load_models(models).predict_probabilities(image)
    flaky = EnsemblePredictor(**OPTIONS).load_models(models)
    calls: list[int] = []
    _inject_out_of_memory(flaky, above=3, calls=calls)
    got = flaky.predict_probabilities(image)
    assert calls[0] > 3, "the first pass should have tried a larger batch"
    assert flaky.runner.max_batch <= 3
    for a, b in zip((got.tumour, got.classes, got.enhancing),
                    (reference.tumour, reference.classes, reference.enhancing)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_case_that_does_not_fit_one_tile_runs_on_the_cpu_with_a_warning(tmp_path, models):
    small_cases(tmp_path / "in", 2)
    plain = PredictOptions(tmp_path / "in", tmp_path / "plain", progress=False)
    run_predict(EnsemblePredictor(**OPTIONS).load_models(models), plain, io.StringIO())
    starved = EnsemblePredictor(**OPTIONS).load_models(models)
    _inject_out_of_memory(starved, above=0, calls=[])
    stream = io.StringIO()
    options = PredictOptions(tmp_path / "in", tmp_path / "out", progress=False, report=tmp_path / "report.json")
    results = run_predict(starved, options, stream)
    assert [r.status for r in results] == [CaseStatus.OK, CaseStatus.OK]
    assert all(CPU_FALLBACK_WARNING in r.warnings for r in results)
    assert stream.getvalue().count(CPU_FALLBACK_WARNING.message) == 2
    for case in json.loads((tmp_path / "report.json").read_text())["cases"]:
        assert CPU_FALLBACK_WARNING.message in case["warnings"] and "cpu_fallback" in case["warning_codes"]
    _assert_same_label_maps(tmp_path / "out", tmp_path / "plain")


def test_finishing_a_case_overlaps_predicting_the_next_and_at_most_two_are_in_flight(tmp_path, models, monkeypatch):
    small_cases(tmp_path / "in", 3)
    ids = [c.case_id for c in find_cases(tmp_path / "in").cases]
    started = {case_id: threading.Event() for case_id in ids}
    lock, in_flight, peak, overlapped = threading.Lock(), [0], [0], []
    predict, finish = CaseRunner.predict, CaseRunner.finish

    def observed_predict(self, prepared, progress=None):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        started[prepared.loaded.files.case_id].set()
        return predict(self, prepared, progress)

    def waiting_finish(self, loaded, prediction):
        index = ids.index(loaded.files.case_id)
        if index + 1 < len(ids):  # in a sequential loop this would wait in vain
            overlapped.append(started[ids[index + 1]].wait(timeout=30))
        try:
            return finish(self, loaded, prediction)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(CaseRunner, "predict", observed_predict)
    monkeypatch.setattr(CaseRunner, "finish", waiting_finish)
    stream = io.StringIO()
    results = run_predict(EnsemblePredictor(**OPTIONS).load_models(models),
                          PredictOptions(tmp_path / "in", tmp_path / "out", progress=False), stream)
    assert overlapped == [True, True]
    assert peak[0] == 2
    assert [r.case_id for r in results] == ids and all(r.status is CaseStatus.OK for r in results)
    lines = [line for line in stream.getvalue().splitlines() if ": ok " in line]
    assert [line.split(":")[0] for line in lines] == ids  # printed in case order


def test_a_failure_while_finishing_fails_that_case_only(tmp_path, models, monkeypatch):
    small_cases(tmp_path / "in", 3)
    ids = [c.case_id for c in find_cases(tmp_path / "in").cases]
    finish = CaseRunner.finish

    def failing_finish(self, loaded, prediction):
        if loaded.files.case_id == ids[1]:
            raise OSError(28, "No space left on device")
        return finish(self, loaded, prediction)

    monkeypatch.setattr(CaseRunner, "finish", failing_finish)
    stream = io.StringIO()
    results = run_predict(EnsemblePredictor(**OPTIONS).load_models(models),
                          PredictOptions(tmp_path / "in", tmp_path / "out", progress=False), stream)
    assert [r.status for r in results] == [CaseStatus.OK, CaseStatus.FAILED, CaseStatus.OK]
    assert ids[1] in results[1].error and "No space left on device" in results[1].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{ids[0]}.nii.gz", f"{ids[2]}.nii.gz"]
    assert f"FAILED {results[1].error}" in stream.getvalue()


def test_the_pipelined_run_writes_what_one_case_at_a_time_writes(tmp_path, models):
    small_cases(tmp_path / "in", 2)
    run_predict(EnsemblePredictor(**OPTIONS).load_models(models),
                PredictOptions(tmp_path / "in", tmp_path / "out", progress=False), io.StringIO())
    options = PredictOptions(tmp_path / "in", tmp_path / "single", postprocess=PostprocessConfig())
    (tmp_path / "single").mkdir()
    runner = CaseRunner(EnsemblePredictor(**OPTIONS).load_models(models), options)
    for case in find_cases(tmp_path / "in").cases:
        runner.run(load_case(case))
    _assert_same_label_maps(tmp_path / "out", tmp_path / "single")


def _report_without_times_and_folders(path):
    cases = json.loads(path.read_text())["cases"]
    for case in cases:
        case.pop("seconds")
        case["output"] = Path(case["output"]).name
    return cases


@pytest.mark.parametrize("ahead", [1, 3])
def test_cases_prepared_ahead_get_the_labels_and_report_of_one_at_a_time(tmp_path, models, ahead):
    small_cases(tmp_path / "in", 3)
    for name, n in (("serial", 0), ("ahead", ahead)):
        predictor = EnsemblePredictor(**OPTIONS).load_models(models)
        # Random weights' scout would leave N4 too little brain to fit; with none, N4 fits every modality.
        predictor.scout_tumour = lambda image: np.zeros(image.shape[1:], bool)
        options = PredictOptions(tmp_path / "in", tmp_path / name, progress=False, prepare_ahead=n,
                                 report=tmp_path / f"{name}.json")
        results = run_predict(predictor, options, io.StringIO())
        assert [r.status for r in results] == [CaseStatus.OK] * 3
        assert not any("bias correction" in w.message for r in results for w in r.warnings), "N4 should fit all"
    _assert_same_label_maps(tmp_path / "ahead", tmp_path / "serial")
    assert (_report_without_times_and_folders(tmp_path / "ahead.json")
            == _report_without_times_and_folders(tmp_path / "serial.json"))


def test_preparing_ahead_overlaps_the_next_cases_correction_with_the_ensemble(tmp_path, models, monkeypatch):
    small_cases(tmp_path / "in", 3)
    ids = [c.case_id for c in find_cases(tmp_path / "in").cases]
    prepared = {case_id: threading.Event() for case_id in ids}
    threads, overlapped = {}, []
    prepare, predict = CaseRunner.prepare, CaseRunner.predict

    def observed_prepare(self, loaded):
        threads[loaded.files.case_id] = threading.current_thread()
        result = prepare(self, loaded)
        prepared[loaded.files.case_id].set()
        return result

    def waiting_predict(self, case, progress=None):
        index = ids.index(case.loaded.files.case_id)
        threads.setdefault("device", threading.current_thread())
        if index + 1 < len(ids):  # corrected one at a time before its ensemble pass, this would wait in vain
            overlapped.append(prepared[ids[index + 1]].wait(timeout=30))
        return predict(self, case, progress)

    monkeypatch.setattr(CaseRunner, "prepare", observed_prepare)
    monkeypatch.setattr(CaseRunner, "predict", waiting_predict)
    results = run_predict(EnsemblePredictor(**OPTIONS).load_models(models),
                          PredictOptions(tmp_path / "in", tmp_path / "out", progress=False, prepare_ahead=1),
                          io.StringIO())
    assert [r.status for r in results] == [CaseStatus.OK] * 3
    assert overlapped == [True, True]
    assert all(threads[case_id] is not threads["device"] for case_id in ids)


def test_a_failure_while_preparing_ahead_fails_that_case_only(tmp_path, models, monkeypatch):
    small_cases(tmp_path / "in", 3)
    ids = [c.case_id for c in find_cases(tmp_path / "in").cases]
    prepare = CaseRunner.prepare

    def failing_prepare(self, loaded):
        if loaded.files.case_id == ids[1]:
            raise RuntimeError("ITK ERROR: N4BiasFieldCorrectionImageFilter: inputs do not occupy the same space")
        return prepare(self, loaded)

    monkeypatch.setattr(CaseRunner, "prepare", failing_prepare)
    stream = io.StringIO()
    results = run_predict(EnsemblePredictor(**OPTIONS).load_models(models),
                          PredictOptions(tmp_path / "in", tmp_path / "out", progress=False, prepare_ahead=2), stream)
    assert [r.status for r in results] == [CaseStatus.OK, CaseStatus.FAILED, CaseStatus.OK]
    assert ids[1] in results[1].error and "N4BiasFieldCorrectionImageFilter" in results[1].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{ids[0]}.nii.gz", f"{ids[2]}.nii.gz"]
    assert f"FAILED {results[1].error}" in stream.getvalue()


def test_a_negative_prepare_ahead_is_refused(tmp_path):
    with pytest.raises(ValueError, match="prepare_ahead"):
        PredictOptions(tmp_path, tmp_path / "out", prepare_ahead=-1)


def test_ieee_fp32_holds_until_the_last_thread_inside_leaves(monkeypatch):
    """A reader's scout and the device's ensemble may both run in fp32 at once: the first to leave must not
    hand the other TF32 convolutions."""
    conv = torch.backends.cudnn.conv
    monkeypatch.setattr(conv, "fp32_precision", "tf32")
    inside, release = threading.Event(), threading.Event()

    def scout():
        with ieee_fp32():
            inside.set()
            release.wait(timeout=30)

    reader = threading.Thread(target=scout)
    with ieee_fp32():  # the device's thread enters first and leaves first
        reader.start()
        assert inside.wait(timeout=30)
    assert conv.fp32_precision == "ieee", "the reader is still inside"
    release.set()
    reader.join()
    assert conv.fp32_precision == "tf32"
