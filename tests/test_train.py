import copy
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import ndimage

import app.train
from app.augment import AugmentConfig
from app.io import find_cases
from app.model import build_model
from app.options import BiasCorrection
from app.phantoms import PhantomMix, generate
from app.train import (
    PATCH,
    CaseDifficulty,
    PreparedCases,
    TrainConfig,
    TrainingCase,
    TrainingSetupError,
    WeightAverage,
    _batch,
    _masked_mean,
    _patch_cross_entropy,
    _window,
    case_probabilities,
    is_rare_kind,
    load_validation,
    make_optimizer,
    prepare_case,
    sample_patches,
    split_folds,
    train_fold,
    train_step,
    training_autocast,
    transfer_masks,
    validation_dice,
)
from app.weights import load_ensemble

from .helpers import python_cli

pytestmark = pytest.mark.slow  # `./tests/run_tests.sh -m "not slow"` for a quick loop

# Small enough for CI, long enough to learn: momentum 0.9 / lr 1e-2 (the same steady-state step as the
# solver's 0.99 / 1e-3) reacts within ~10 steps instead of ~100. Augmentation off: it slows learning at this
# size; its own tests and test_augmentation_is_part_of_the_step cover it.
TINY = TrainConfig(variant="omnet_cga", width=4, folds=2, stage_steps=(30, 30, 340), batch=6, lr=1e-2,
                   momentum=0.9, validate_every=200, lr_halve_every=1000, device="cpu", max_tile=(64, 64, 64),
                   augment="none")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_cases")
    generate(folder, 4, seed=45, size=(64, 64, 48))  # the held-out case has a tumour large enough to score
    return find_cases(folder).cases


def test_tiny_training_lowers_loss_and_beats_untrained_dice(cases, tmp_path):
    torch.set_num_threads(2)
    result = train_fold(TINY, cases[:3], cases[3:], tmp_path / "fold", fold=0, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    torch.manual_seed(0)
    untrained = validation_dice(build_model("omnet_cga", 4), load_validation(cases[3:]), TINY, torch.device("cpu"))
    assert result.best_dice["WT"] > untrained["WT"] + 0.2, (result.best_dice, untrained)


def test_samplers_put_centres_inside_their_regions(cases):
    case = prepare_case(cases[0])
    rng = np.random.default_rng(0)
    centre = tuple(p // 2 for p in PATCH)
    _, brain = sample_patches([case], 0, 30, rng)
    assert (brain[(slice(None), *centre)] > 0).all()
    _, near = sample_patches([case], 1, 30, rng)
    ball = np.zeros(PATCH, bool)
    ball[centre] = True
    ball = ndimage.distance_transform_edt(~ball) <= 5
    assert all(np.isin(t[ball], (1, 2, 3)).any() for t in near)
    _, core = sample_patches([case], 2, 30, rng)
    assert np.isin(core[(slice(None), *centre)], (1, 3)).all()


def _target(ncr: int, et: int) -> np.ndarray:
    """A brain (class 4) holding a core of ``ncr`` NCR and ``et`` ET voxels."""
    target = np.full(40_000, 4, np.uint8)
    target[:ncr] = 1
    target[ncr:ncr + et] = 3
    return target.reshape(40, 50, 20)


def test_rare_kinds_are_cores_without_rim_solidly_enhancing_or_small():
    assert is_rare_kind(_target(ncr=5000, et=100))  # almost no enhancing rim
    assert is_rare_kind(_target(ncr=200, et=5000))  # solidly enhancing
    assert is_rare_kind(_target(ncr=1000, et=1500))  # small core
    assert not is_rare_kind(_target(ncr=3000, et=3000))
    assert not is_rare_kind(_target(ncr=0, et=0))  # no tumour: nothing to oversample
    assert is_rare_kind(torch.from_numpy(_target(ncr=5000, et=0)))  # device tensors too


def _case_with(target: np.ndarray, value: float) -> TrainingCase:
    padded = np.pad(target, [(p // 2, p // 2) for p in PATCH])
    image = np.full((4, *padded.shape), value, np.float32)
    inner = np.zeros(padded.shape, bool)
    inner[tuple(slice(p // 2, -(p // 2)) for p in PATCH)] = True
    centres = [np.flatnonzero(inner & (padded > 0)), np.flatnonzero(inner & np.isin(padded, (1, 2, 3))),
               np.flatnonzero(inner & np.isin(padded, (1, 3)))]
    return TrainingCase(f"case{value:g}", image, padded, centres, np.zeros(4, np.float32))


def test_rare_cases_are_drawn_by_their_weight():
    common, rare = _case_with(_target(3000, 3000), 0.0), _case_with(_target(5000, 0), 1.0)
    assert case_probabilities([common, common], 3.0) is None  # nothing rare: the uniform draw
    assert case_probabilities([common, rare], 1.0) is None
    p = case_probabilities([common, rare, common], 3.0)
    assert np.allclose(p, [0.2, 0.6, 0.2])
    with pytest.raises(ValueError, match="rare_case_weight"):
        case_probabilities([common, rare], 0.0)
    images, _ = sample_patches([common, rare], 0, 400, np.random.default_rng(0),
                               case_probabilities=np.array([0.25, 0.75]))
    share = float(images[:, 0, 0, 0, 0].mean())  # the rare case's patches are all ones
    assert 0.68 < share < 0.82, share


def test_hard_cases_are_drawn_by_their_running_loss_clipped_and_resumable():
    difficulty = CaseDifficulty.start(1.0, 3)
    assert np.allclose(difficulty.probabilities(None), 1 / 3)  # nothing seen yet: the uniform draw
    difficulty.update(np.array([0, 1, 1]), np.array([1.0, 3.0, 3.0]))
    assert difficulty.losses[0] == 1.0 and difficulty.losses[1] == pytest.approx(3.0)  # first sight, then EMA
    p = difficulty.probabilities(None)  # relative 0.5, 1.5 and unseen 1
    assert np.allclose(p, np.array([0.5, 1.5, 1.0]) / 3.0)
    assert np.allclose(difficulty.probabilities(np.array([0.5, 0.25, 0.25])), np.array([0.25, 0.375, 0.25]) / 0.875)
    steep = CaseDifficulty(8.0, np.array([0.01, 1.0, 100.0]))
    weights = steep.probabilities(None) / steep.probabilities(None).min()
    assert weights.max() == pytest.approx(16.0)  # 4x and 0.25x are the limits
    saved = CaseDifficulty.start(1.0, 3).saved()
    assert saved == [None, None, None]
    restored = CaseDifficulty.start(2.0, 3, difficulty.saved())
    assert np.allclose(np.nan_to_num(restored.losses, nan=-1), np.nan_to_num(difficulty.losses, nan=-1))
    with pytest.raises(ValueError, match="3 training cases"):
        CaseDifficulty.start(1.0, 3, [1.0])
    with pytest.raises(ValueError, match="hard_case_power"):
        CaseDifficulty.start(0.0, 3)


def test_hard_case_training_tracks_case_losses_through_the_step_and_the_checkpoint(cases, tmp_path):
    cfg = replace(TINY, stage_steps=(0, 0, 12), validate_every=6, hard_case_power=2.0)
    data = [prepare_case(c) for c in cases[:3]]
    model = build_model(cfg.variant, cfg.width)
    difficulty = CaseDifficulty.start(cfg.hard_case_power, len(data))
    for step in range(6):
        train_step(model, make_optimizer(model, cfg), data, cfg, step, np.random.default_rng(step),
                   torch.device("cpu"), False, difficulty=difficulty)
    assert not np.isnan(difficulty.losses).all() and (difficulty.losses[~np.isnan(difficulty.losses)] > 0).all()
    # through the real loop: the running losses are checkpointed, so a resumed run continues them
    result = train_fold(cfg, cases[:2], cases[3:], tmp_path / "hard", 0, False)
    meta = json.loads((tmp_path / "hard" / "last.json").read_text())
    assert result.steps == 12 and len(meta["case_losses"]) == 2
    assert all(v is None or v > 0 for v in meta["case_losses"]) and any(v is not None for v in meta["case_losses"])
    assert result.config["hard_case_power"] == 2.0


def test_task1_tumour_fraction_centres_task1_patches_near_the_tumour():
    target = np.full((40, 60, 60), 4, np.uint8)
    target[18:22, 5:10, 5:10] = 1  # a small core in a large brain
    case = _case_with(target, 0.0)
    centre = (slice(None), *(p // 2 for p in PATCH))
    for fraction, low, high in ((0.0, 0.0, 0.05), (0.5, 0.3, 0.7), (1.0, 1.0, 1.0)):
        _, y, origin, _, _ = _batch([case], (0, 1), 50, np.random.default_rng(1), torch.device("cpu"),
                                    task1_tumour_fraction=fraction)
        assert origin.tolist() == [0] * 50 + [1] * 50  # the streams keep their blocks
        near = (y[:50][centre] == 1).float().mean().item()
        assert low <= near <= high, (fraction, near)


def test_patch_windows_read_zeros_where_they_leave_the_padded_case():
    array = np.arange(2 * 10 * 12 * 14, dtype=np.float32).reshape(2, 10, 12, 14) + 1
    reference = np.pad(array, [(0, 0), (30, 30), (30, 30), (30, 30)])
    for starts in ((-3, -5, 2), (4, 6, 8), (7, -1, 9), (-12, -20, -15), (12, 2, 3), (9, 11, 13)):
        expected = reference[(slice(None), *(slice(s + 30, s + 30 + n) for s, n in zip(starts, (8, 16, 24))))]
        np.testing.assert_array_equal(_window(array, starts, (8, 16, 24)), expected)
        torch.testing.assert_close(_window(torch.from_numpy(array), starts, (8, 16, 24)), torch.from_numpy(expected))
    assert _window(array, (1, 1, 1), (8, 8, 8)).base is not None  # inside: a view, nothing copied


def test_larger_training_patches_are_centred_in_their_stream():
    target = np.full((40, 60, 60), 4, np.uint8)
    target[2:6, 3:9, 50:57] = 1  # a core near the corner: the 24x48x48 patches around it leave the case
    case = _case_with(target, 0.0)
    _, y, origin, _, _ = _batch([case], (0, 1, 2), 5, np.random.default_rng(0), torch.device("cpu"),
                                patch_size=(24, 48, 48))
    assert tuple(y.shape) == (15, 24, 48, 48) and origin.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert (y[10:, 12, 24, 24] == 1).all()  # task 3's patches are centred on the core


def test_train_cli_trains_on_larger_patches_and_refuses_sizes_the_network_cannot_pool(cases, tmp_path):
    data = cases[0].reference.parent.parent
    out = tmp_path / "weights"
    args = ["train", "--data", str(data), "--out", str(out), "--width", "4", "--folds", "2", "--stage-steps", "1,1,2",
            "--batch", "2", "--validate-every", "4", "--quiet", "--device", "cpu", "--fold", "0"]
    refused = python_cli(*args, "--patch-size", "20,32,32")
    assert refused.returncode == 2 and "--patch-size 20,32,32" in refused.stderr, refused.stderr
    result = python_cli(*args, "--patch-size", "24,48,48", "--truth-recode", "4:0")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["config"]["patch_size"] == [24, 48, 48]
    assert manifest["training"]["data"]["truth_recode"] == "4:0"  # the data's reading, recorded with it


def test_training_flags_reject_out_of_range_sampling_numbers(tmp_path):
    for flag, value in (("--rare-case-weight", "0"), ("--task1-tumour-fraction", "1.5"), ("--hard-case-power", "5")):
        run = python_cli("train", "--phantoms", "2", "--out", str(tmp_path), flag, value)
        assert run.returncode == 2 and flag in run.stderr, run.stderr


def _patches_with_fraction(label: int, fraction: float, n_voxels: int = int(np.prod(PATCH))):
    target = np.full(n_voxels, 4, np.int64)
    target[: int(round(fraction * n_voxels))] = label
    return torch.from_numpy(target.reshape(PATCH))


def test_transfer_includes_exactly_forty_and_fifty_percent_and_excludes_just_under():
    voxels = int(np.prod(PATCH))
    at_40 = _patches_with_fraction(2, 0.4)
    under_40 = _patches_with_fraction(2, (0.4 * voxels - 1) / voxels)
    at_50 = _patches_with_fraction(1, 0.5)
    under_50 = _patches_with_fraction(3, (0.5 * voxels - 1) / voxels)
    target = torch.stack([at_40, under_40, at_50, under_50, at_50])
    origin = torch.tensor([0, 0, 0, 0, 1])
    to_task1, to_task2, to_task3 = transfer_masks(target, origin, enabled=True)
    assert to_task1.tolist() == [True, True, True, True, False]
    # at_50 holds 50% core = 50% tumour too, so it also enters task 2.
    assert to_task2.tolist() == [True, False, True, True, True]
    assert to_task3.tolist() == [False, False, True, False, True]
    off = transfer_masks(target, origin, enabled=False)
    assert off[1].tolist() == [False, False, False, False, True] and not off[2].any()


def test_curriculum_switches_stages_as_configured():
    cfg = replace(TINY, stage_steps=(3, 2, 5))
    assert [cfg.active_tasks(s) for s in (0, 2, 3, 4, 5, 9)] == [(0,), (0,), (0, 1), (0, 1), (0, 1, 2), (0, 1, 2)]
    assert replace(cfg, curriculum=False).active_tasks(0) == (0, 1, 2)


# With hard cases the running losses resume too; with a weight average (from step 6) the average does.
@pytest.mark.parametrize(("hard_case_power", "average_from"), [(0.0, -1), (2.0, -1), (0.0, 6)])
def test_resumed_run_continues_from_the_saved_step_and_matches_a_straight_run(cases, tmp_path, hard_case_power,
                                                                             average_from):
    torch.set_num_threads(1)
    cfg = replace(TINY, stage_steps=(4, 4, 12), validate_every=10, batch=2, hard_case_power=hard_case_power,
                  average_from=average_from)
    straight = train_fold(cfg, cases[:2], cases[3:], tmp_path / "straight", fold=0, progress=False)
    first = train_fold(replace(cfg, stage_steps=(4, 4, 2)), cases[:2], cases[3:], tmp_path / "resumed", 0, False)
    assert first.steps == 10
    # killed after the checkpoint's rename but before its readable copy: the checkpoint alone resumes
    (tmp_path / "resumed" / "last.json").write_text("{}")
    resumed = train_fold(cfg, cases[:2], cases[3:], tmp_path / "resumed", fold=0, progress=False)
    assert [h["step"] for h in resumed.history] == [10, 20] and resumed.steps == 20
    _assert_same_tensors(tmp_path / "straight" / "last.safetensors", tmp_path / "resumed" / "last.safetensors")
    assert straight.history[-1]["loss"] == pytest.approx(resumed.history[-1]["loss"], rel=1e-3)
    if average_from >= 0:  # 14 steps averaged (6..19), the same average either way
        assert straight.averaged_steps == resumed.averaged_steps == 14
        _assert_same_tensors(tmp_path / "straight" / "average.safetensors",
                             tmp_path / "resumed" / "average.safetensors")
        assert set(resumed.average_dice) == {"WT", "TC", "ET"}
        assert {"average_dice_WT", "dice_WT"} <= set(resumed.history[-1])
    else:
        assert not (tmp_path / "straight" / "average.safetensors").exists() and straight.averaged_steps == 0


def test_checkpoint_without_its_progress_record_resumes_from_last_json(cases, tmp_path):
    # checkpoints written before the progress record moved into them carry none: last.json is read instead
    torch.set_num_threads(1)
    cfg = replace(TINY, stage_steps=(2, 2, 6), validate_every=5, batch=2)
    train_fold(replace(cfg, stage_steps=(2, 2, 1)), cases[:2], cases[3:], tmp_path, 0, False)
    checkpoint = tmp_path / "last.safetensors"
    save_file(load_file(str(checkpoint)), str(checkpoint))  # the same tensors, no metadata
    resumed = train_fold(cfg, cases[:2], cases[3:], tmp_path, 0, False)
    assert [h["step"] for h in resumed.history] == [5, 10] and resumed.steps == 10


def _assert_same_tensors(path_a, path_b):
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_weight_average_is_the_uniform_mean_of_the_models_it_saw(tmp_path):
    models = [build_model("omnet_cga", 4) for _ in range(3)]
    for k, model in enumerate(models):
        for buffer in model.buffers():
            if not buffer.is_floating_point():
                buffer.fill_(k)  # BatchNorm's num_batches_tracked: the latest is kept
    average = WeightAverage()
    for model in models:
        average.update(model)
    states = [m.state_dict() for m in models]
    for key, value in average.state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(s[key] for s in states) / 3)
        else:
            assert torch.equal(value, states[-1][key])
    assert average.count == 3
    out = average.model_like(models[0])
    key = next(k for k, v in average.state.items() if v.is_floating_point())
    assert out is not models[0] and torch.equal(out.state_dict()[key], average.state[key])
    average.update(models[0])  # one copy, reloaded with the latest average at each call
    assert average.model_like(models[0]) is out and torch.equal(out.state_dict()[key], average.state[key])
    with pytest.raises(ValueError, match="no weights averaged"):
        WeightAverage().model_like(models[0])


def test_folds_are_disjoint_and_cover_every_case():
    ids = [f"c{i}" for i in range(23)]
    folds = split_folds(ids, 10, seed=0)
    assert sorted(sum(folds, [])) == sorted(ids) and all(folds)
    with pytest.raises(ValueError):
        split_folds(ids[:5], 10, seed=0)


def test_train_cli_writes_a_weights_folder_predict_can_load(cases, tmp_path):
    data = cases[0].reference.parent.parent
    out = tmp_path / "weights"
    args = ["train", "--data", str(data), "--out", str(out), "--width", "4", "--folds", "2", "--stage-steps", "2,2,2",
            "--batch", "2", "--validate-every", "3", "--quiet", "--device", "cpu", "--variant", "omnet"]
    for fold, precision in (("0", "fp32"), ("1", "auto")):  # as two separate cluster jobs
        result = python_cli(*args, "--fold", fold, "--precision", precision)
        assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["fold"] for f in manifest["folds"]] == [0, 1]
    assert [f["precision"] for f in manifest["folds"]] == ["fp32", "auto"]
    assert manifest["training"]["config"]["variant"] == "omnet"
    loaded, models = load_ensemble(out)
    assert loaded.variant == "omnet" and len(models) == 2
    assert [f["published"] for f in manifest["folds"]] == ["best", "best"]


def test_train_cli_publishes_the_weight_average_when_asked(cases, tmp_path):
    data = cases[0].reference.parent.parent
    out = tmp_path / "weights"
    args = ["train", "--data", str(data), "--out", str(out), "--width", "4", "--folds", "2", "--stage-steps", "2,2,4",
            "--batch", "2", "--validate-every", "4", "--quiet", "--device", "cpu", "--fold", "0"]
    refused = python_cli(*args, "--average-from", "8")  # beyond the last step: nothing would be averaged
    assert refused.returncode == 2 and "--average-from 8" in refused.stderr
    result = python_cli(*args, "--average-from", "5")
    assert result.returncode == 0, result.stderr
    [fold] = json.loads((out / "manifest.json").read_text())["folds"]
    assert fold["published"] == "average" and fold["averaged_steps"] == 3
    assert set(fold["average_validation_dice"]) == {"WT", "TC", "ET"}
    published = load_file(str(out / "fold_0.safetensors"))
    average = load_file(str(out / "runs" / "fold_0" / "average.safetensors"))
    for key, value in average.items():  # published in float16, as every fold
        torch.testing.assert_close(published[key].to(value.dtype), value, rtol=1e-3, atol=1e-3)
    # Resumed for more steps without the flag: the run stops averaging and publishes its best snapshot.
    longer = [a if a != "2,2,4" else "2,2,8" for a in args]
    assert python_cli(*longer).returncode == 0
    [fold] = json.loads((out / "manifest.json").read_text())["folds"]
    assert fold["published"] == "best" and fold["steps"] == 12


def test_cascade_networks_train_only_on_their_own_tasks_patches(cases):
    """MC3's three networks are independent: a step touches only the active tasks' networks, each seeing
    only its own stream's patches (so neither the weights nor the BatchNorm statistics of the others move)."""
    torch.set_num_threads(1)
    cfg = replace(TINY, variant="cascade", stage_steps=(2, 2, 2), batch=2)
    model = build_model(cfg.variant, cfg.width)
    optimizer = make_optimizer(model, cfg)
    data = [prepare_case(c) for c in cases[:2]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_step(model, optimizer, data, cfg, 0, np.random.default_rng(0), torch.device("cpu"), False)
    assert set(losses) == {"loss_task1"}
    after = model.state_dict()
    changed = {int(k.split(".")[1]) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {0}
    losses = train_step(model, optimizer, data, cfg, 4, np.random.default_rng(1), torch.device("cpu"), False)
    assert set(losses) == {"loss_task1", "loss_task2", "loss_task3"}
    assert all(np.isfinite(v) for v in losses.values())


def test_augmentation_is_part_of_the_step(cases):
    torch.set_num_threads(1)
    data = [prepare_case(c) for c in cases[:2]]
    losses = {}
    for level in ("none", "strong"):
        cfg = replace(TINY, augment=level, stage_steps=(0, 0, 5))
        torch.manual_seed(0)
        model = build_model(cfg.variant, cfg.width)
        augment = AugmentConfig.for_level(level)
        out = train_step(model, make_optimizer(model, cfg), data, cfg, 0, np.random.default_rng(0),
                         torch.device("cpu"), False, augment, torch.Generator().manual_seed(0))
        losses[level] = float(out["loss_task1"])
    assert losses["none"] != losses["strong"]


def test_training_precision_auto_is_fp32_on_a_cpu_and_setup_errors_end_in_one_line(tmp_path):
    cpu = torch.device("cpu")
    assert not training_autocast("auto", cpu) and not training_autocast("fp32", cpu)
    with pytest.raises(TrainingSetupError, match="bf16"):
        training_autocast("bf16", cpu)
    with pytest.raises(ValueError, match="precision"):
        training_autocast("fp16", cpu)
    out = tmp_path / "weights"
    run = python_cli("train", "--phantoms", "2", "--phantom-size", "48,48,32", "--out", str(out), "--width", "4",
                     "--folds", "2", "--device", "cpu", "--precision", "bf16", "--quiet")
    assert run.returncode == 2 and "--precision bf16" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not out.exists()  # refused before anything was prepared or written
    run = python_cli("train", "--phantoms", "2", "--phantom-size", "48,48,32", "--out", str(out), "--width", "4",
                     "--folds", "2", "--fold", "2", "--device", "cpu", "--quiet")
    assert run.returncode == 2 and "--fold 2 outside 0..1" in run.stderr and "Traceback" not in run.stderr, run.stderr
    if not torch.cuda.is_available():
        run = python_cli("train", "--phantoms", "2", "--phantom-size", "48,48,32", "--out", str(out), "--width", "4",
                         "--folds", "2", "--device", "cuda", "--quiet")
        assert run.returncode == 2 and "CUDA is not available" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
        assert not out.exists()


def test_fp32_training_runs_ieee_convolutions_and_restores_the_setting(cases, tmp_path, monkeypatch):
    """cuDNN runs fp32 convolutions as TF32 unless told otherwise: training in fp32 (a CPU's only choice,
    `--precision fp32` on a GPU) must step with IEEE fp32 convolutions, as inference does."""
    seen = []

    def spying_step(*args, **kwargs):
        seen.append(torch.backends.cudnn.conv.fp32_precision)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(app.train, "train_step", spying_step)
    before = torch.backends.cudnn.conv.fp32_precision
    train_fold(replace(TINY, stage_steps=(1, 1, 1), batch=2, precision="fp32"), cases[:2], cases[3:],
               tmp_path / "fold", 0, False)
    assert seen and set(seen) == {"ieee"}
    assert torch.backends.cudnn.conv.fp32_precision == before


def test_compiled_network_computes_the_eager_gradients_and_its_step_moves_the_model_itself(cases):
    """``--compile`` changes how the kernels run, not what they compute. On a real training batch, with
    dropout off (Inductor draws its own random numbers), the compiled network's loss is the eager one's and
    its gradients lie as near float64's as eager fp32's do (at initialisation these gradients are
    ill-conditioned: eager fp32 itself is ~10% off in the encoder, compiled nearer); a compiled training
    step then moves the model whose state dict is saved, under its own names."""
    torch.set_num_threads(2)
    data = [prepare_case(c) for c in cases[:2]]
    x, y, _, _, _ = _batch(data, (0, 1, 2), 2, np.random.default_rng(0), torch.device("cpu"))
    targets = app.train.task_targets(y)
    torch.manual_seed(0)
    model = build_model("omnet_cga", 4).train()
    model.backbone.dropout.p = 0.0

    def gradients(network, forward, images):
        network.zero_grad()
        loss = sum(F.cross_entropy(o.to(images.dtype), t) for o, t in zip(forward(images), targets))
        loss.backward()
        return float(loss), {k: p.grad.double() for k, p in network.named_parameters()}

    reference = copy.deepcopy(model).double()
    loss64, exact = gradients(reference, reference, x.double())
    eager_model = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    loss32, eager = gradients(eager_model, eager_model, x)
    compiled_model = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    loss_compiled, compiled = gradients(compiled_model, torch.compile(compiled_model), x)
    assert loss_compiled == pytest.approx(loss32, rel=1e-5) and loss32 == pytest.approx(loss64, rel=1e-5)
    for key, g in exact.items():
        scale = float(g.norm())
        if scale < 1e-9:  # conv biases that a BatchNorm follows: zero in exact arithmetic, rounding in fp32
            continue
        eager_error, compiled_error = float((eager[key] - g).norm()), float((compiled[key] - g).norm())
        assert compiled_error <= max(2 * eager_error, 1e-3 * scale), (key, compiled_error, eager_error, scale)

    cfg = replace(TINY, stage_steps=(0, 0, 1), batch=2)
    start = {k: v.clone() for k, v in compiled_model.state_dict().items()}
    train_step(torch.compile(compiled_model), make_optimizer(compiled_model, cfg), data, cfg, 0,
               np.random.default_rng(0), torch.device("cpu"), False)
    after = compiled_model.state_dict()
    assert set(after) == set(start)  # no wrapper prefix in the names a checkpoint saves
    assert any(not torch.equal(start[k], v) for k, v in after.items())


def test_compile_is_refused_before_preparation_where_it_cannot_run(cases, tmp_path, monkeypatch):
    out = tmp_path / "weights"
    run = python_cli("train", "--phantoms", "2", "--phantom-size", "48,48,32", "--out", str(out), "--width", "4",
                     "--folds", "2", "--device", "cpu", "--variant", "cascade", "--compile", "--quiet")
    assert run.returncode == 2 and "--compile" in run.stderr and "cascade" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not out.exists()

    def no_backend(*args, **kwargs):
        raise RuntimeError("Compiler: g++ not found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_backend)
    cfg = replace(TINY, compile=True)
    with pytest.raises(TrainingSetupError, match=r"--compile: torch.compile cannot run on cpu here \(Compiler: g\+\+ "
                                                 r"not found\)$"):
        app.train.train_ensemble(cfg, cases, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_train_cli_compiles_the_step_and_records_it(cases, tmp_path):
    data = cases[0].reference.parent.parent
    out = tmp_path / "weights"
    result = python_cli("train", "--data", str(data), "--out", str(out), "--width", "4", "--folds", "2",
                        "--stage-steps", "0,0,3", "--batch", "2", "--validate-every", "3", "--quiet", "--device",
                        "cpu", "--fold", "0", "--compile")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["config"]["compile"] is True
    [fold] = manifest["folds"]
    assert fold["steps"] == 3
    loaded, models = load_ensemble(out)
    assert len(models) == 1


def test_masked_loss_equals_the_loss_of_the_chosen_patches():
    torch.manual_seed(0)
    logits, target = torch.randn(5, 3, 4, 4, 4), torch.randint(0, 3, (5, 4, 4, 4))
    chosen = torch.tensor([True, False, True, True, False])
    expected = F.cross_entropy(logits[chosen], target[chosen])
    per_patch = _patch_cross_entropy(logits, target)
    torch.testing.assert_close(_masked_mean(per_patch, chosen), expected)
    assert float(_masked_mean(per_patch, torch.zeros(5, dtype=torch.bool))) == 0.0


def test_train_cli_on_generated_phantoms_prepares_then_trains(tmp_path):
    out, cache = tmp_path / "weights", tmp_path / "cache"
    args = ["train", "--phantoms", "4", "--phantom-seed", "45", "--phantom-size", "64,64,48", "--out", str(out),
            "--width", "4", "--folds", "2", "--stage-steps", "1,1,1", "--batch", "2", "--validate-every", "3",
            "--quiet", "--device", "cpu", "--cache", str(cache)]
    prepared = python_cli(*args, "--prepare-workers", "2", "--prepare-only")
    assert prepared.returncode == 0, prepared.stderr
    assert len(list(cache.glob("*.image.npy"))) == 4 and not out.exists()
    trained = python_cli(*args, "--fold", "0,1", "--augment", "strong")
    assert trained.returncode == 0, trained.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["data"]["phantoms"]["n"] == 4
    assert manifest["training"]["data"]["phantoms"]["ranges"] == "training"
    assert [(f["fold"], f["augment"]) for f in manifest["folds"]] == [(0, "strong"), (1, "strong")]


def _train_fold_0_on_two_phantoms(tmp_path, *phantom_flags: str) -> tuple[dict, list[str]]:
    """`train --phantoms 2` (seed 45, 48x48x32) with ``phantom_flags``, one step of fold 0 through the CLI:
    the manifest written and the IDs of the cases cached."""
    out, cache = tmp_path / "weights", tmp_path / "cache"
    trained = python_cli("train", "--phantoms", "2", "--phantom-seed", "45", "--phantom-size", "48,48,32",
                         *phantom_flags, "--out", str(out), "--width", "4", "--folds", "2", "--stage-steps",
                         "1,1,1", "--batch", "2", "--validate-every", "3", "--quiet", "--device", "cpu",
                         "--cache", str(cache), "--fold", "0")
    assert trained.returncode == 0, trained.stderr
    cached = sorted(p.name.split(".")[0] for p in cache.glob("*.image.npy"))
    return json.loads((out / "manifest.json").read_text()), cached


def test_wide_phantoms_train_from_their_own_cases_and_are_recorded(tmp_path):
    """`train --phantoms N --phantom-ranges wide`: the wide cases are made (and cached) under their own IDs,
    not the training-range cases of the same seed, and the manifest says which ranges were used."""
    from app.options import PhantomPreset
    from app.train import phantom_cases

    training, wide = (phantom_cases(1, 45, (48, 48, 32), PhantomMix(p))
                      for p in (PhantomPreset.TRAINING, PhantomPreset.WIDE))
    assert training[0].case_id != wide[0].case_id
    assert not np.array_equal(training[0].load()[0], wide[0].load()[0])
    manifest, cached = _train_fold_0_on_two_phantoms(tmp_path, "--phantom-ranges", "wide")
    assert cached == [c.case_id for c in phantom_cases(2, 45, (48, 48, 32), PhantomMix(PhantomPreset.WIDE))]
    assert manifest["training"]["data"]["phantoms"]["ranges"] == "wide"


def test_too_few_cases_for_the_folds_is_a_one_line_usage_error(tmp_path):
    result = python_cli("train", "--phantoms", "1", "--phantom-size", "48,48,32", "--out", str(tmp_path / "w"),
                        "--width", "4", "--folds", "2", "--stage-steps", "1,1,1", "--quiet", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "1 case(s) cannot make 2 folds" in result.stderr and not (tmp_path / "w").exists()


def test_bright_cortex_phantoms_train_from_their_own_cases_and_are_recorded(tmp_path):
    """`train --phantom-bright-cortex 100`: the redrawn cases are cached under their own IDs (a cache shared
    with a plain run of the same seed never hands one the other's case) and the manifest records the share."""
    from app.train import phantom_cases

    plain, bright = (phantom_cases(1, 45, (48, 48, 32), PhantomMix(bright_cortex=b))[0] for b in (0, 100))
    assert plain.case_id == "BraTS-PHA-04500-000" and bright.case_id == "BraTS-PHAC100-04500-000"
    (plain_image, plain_labels), (bright_image, bright_labels) = plain.load(), bright.load()
    assert np.array_equal(plain_labels, bright_labels) and not np.array_equal(plain_image[0], bright_image[0])
    manifest, cached = _train_fold_0_on_two_phantoms(tmp_path, "--phantom-bright-cortex", "100")
    assert cached == [c.case_id for c in phantom_cases(2, 45, (48, 48, 32), PhantomMix(bright_cortex=100))]
    assert manifest["training"]["data"]["phantoms"]["bright_cortex_percent"] == 100
    bad = python_cli("train", "--phantoms", "1", "--phantom-bright-cortex", "-5", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--phantom-bright-cortex" in bad.stderr


def test_bias_corrected_training_cases_lose_a_laid_field_and_keep_their_labels(monkeypatch):
    """`train --bias-correction n4` corrects each case as it is loaded, as predict does: a smooth field laid on
    a phantom is mostly removed in every modality, the labels are the case's own, the fit leaves out the
    true tumour grown as predict's scout grows its own, and the arrays are cached under their own name (a
    cache shared with an uncorrected run never hands one the other's case)."""
    import pickle

    from app.phantoms import _smooth_field
    from app.preprocess import brain_mask
    from app.train import CaseHandle, bias_corrected, phantom_cases

    [plain] = phantom_cases(1, 45, (64, 64, 48))
    raw, labels = plain.load()
    brain = brain_mask(raw)
    field = np.exp(0.4 * _smooth_field(np.random.default_rng(0), raw.shape[1:], 3))
    biased = np.where(brain, raw * field, 0).astype(np.float32)
    [corrected] = bias_corrected([CaseHandle(plain.case_id, lambda: (biased, labels))])
    excluded = []
    fit = app.train.correct_bias
    monkeypatch.setattr(app.train, "correct_bias", lambda *a, exclude, **k: excluded.append(exclude) or fit(
        *a, exclude=exclude, **k))
    image, same_labels = corrected.load()
    assert np.array_equal(same_labels, labels) and corrected.cache_name == f"{plain.case_id}.n4"
    [exclude] = excluded
    assert exclude[labels > 0].all() and exclude.sum() > 2 * (labels > 0).sum()
    inside = brain & (raw > 0).all(0)
    before, after = (np.std(np.log(a[:, inside]) - np.log(raw[:, inside]), axis=1) for a in (biased, image))
    assert (after < 0.75 * before).all() and after.mean() < 0.6 * before.mean(), (before, after)
    [handle] = bias_corrected(phantom_cases(1, 45, (64, 64, 48)))
    assert pickle.loads(pickle.dumps(handle)).cache_name == handle.cache_name  # prepare workers get it whole


def test_training_handles_read_a_folder_or_handles_and_correct_them_when_asked(cases):
    """One door for `train` and `train --prepare-only`: a BraTS folder is read as `folder_cases` reads it (the
    truths re-coded), handles pass through, and n4 wraps each under its own cache name."""
    from app.conventions import TruthRecoding
    from app.train import folder_cases, training_handles

    data = cases[0].reference.parent.parent
    recoding = TruthRecoding.parse("4:0")
    plain = folder_cases(data, recoding)
    assert [h.cache_name for h in training_handles(data, recoding)] == [h.cache_name for h in plain]
    corrected = training_handles(str(data), recoding, "n4")
    assert [h.cache_name for h in corrected] == [f"{h.cache_name}.n4" for h in plain]
    assert all(".recoded-" in h.cache_name for h in corrected)
    assert [h.cache_name for h in training_handles(plain[:1], None, BiasCorrection.N4)] == [corrected[0].cache_name]
    with pytest.raises(ValueError, match="bias_correction"):
        training_handles(plain, None, "n3")


def test_train_cli_records_bias_correction_and_caches_corrected_cases_apart(tmp_path):
    manifest, _ = _train_fold_0_on_two_phantoms(tmp_path, "--bias-correction", "n4")
    assert manifest["training"]["config"]["bias_correction"] == "n4"
    names = sorted(p.name for p in (tmp_path / "cache").glob("*.image.npy"))
    assert names == ["BraTS-PHA-04500-000.n4.image.npy", "BraTS-PHA-04501-000.n4.image.npy"], names
    plain, _ = _train_fold_0_on_two_phantoms(tmp_path / "plain")
    assert plain["training"]["config"]["bias_correction"] == "none"


def test_bright_core_phantoms_train_under_their_own_ids_and_are_recorded(tmp_path):
    from app.train import phantom_cases

    [bright] = phantom_cases(1, 45, (48, 48, 32), PhantomMix(bright_core=100))
    assert bright.case_id == "BraTS-PHAK100-04500-000"
    assert not (bright.load()[1] == 3).any()
    manifest, cached = _train_fold_0_on_two_phantoms(tmp_path, "--phantom-bright-core", "100")
    assert cached == [c.case_id for c in phantom_cases(2, 45, (48, 48, 32), PhantomMix(bright_core=100))]
    assert manifest["training"]["data"]["phantoms"]["bright_core_percent"] == 100


def test_mixed_phantoms_alternate_the_training_and_wide_cases_of_one_series():
    """`--phantom-ranges mixed`: case i is the training-range case i for even i and the wide case i for odd
    i, same ID and same voxels, so it shares their cache entries."""
    from app.options import PhantomPreset
    from app.train import phantom_cases

    size = (48, 48, 32)
    mixed = phantom_cases(4, 45, size, PhantomMix(PhantomPreset.MIXED))
    training = phantom_cases(4, 45, size, PhantomMix(PhantomPreset.TRAINING))
    wide = phantom_cases(4, 45, size, PhantomMix(PhantomPreset.WIDE))
    expected = [training[0], wide[1], training[2], wide[3]]
    assert [c.case_id for c in mixed] == [c.case_id for c in expected]
    for index in (0, 1):
        assert np.array_equal(mixed[index].load()[0], expected[index].load()[0])


def test_init_from_a_weights_folder_starts_every_fold_from_its_own_fold(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["train", "--phantoms", "4", "--phantom-seed", "45", "--phantom-size", "64,64,48", "--width", "4",
            "--folds", "2", "--stage-steps", "1,1,1", "--batch", "2", "--validate-every", "3", "--quiet",
            "--device", "cpu", "--cache", str(tmp_path / "cache"), "--fold", "0,1"]
    assert python_cli(*args, "--out", str(first)).returncode == 0
    # lr 0: the networks' weights stay where they started, so each fold must equal its starting fold.
    resumed = python_cli(*args, "--out", str(second), "--init-from", str(first), "--lr", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert "initialised from" in resumed.stderr and str(first / "fold_1.safetensors") in resumed.stderr
    convs = [k for k, v in load_file(str(first / "fold_0.safetensors")).items() if v.ndim == 5]
    start = [load_file(str(first / f"fold_{k}.safetensors")) for k in (0, 1)]
    trained = [load_file(str(second / f"fold_{k}.safetensors")) for k in (0, 1)]
    for k in (0, 1):
        assert all(torch.equal(trained[k][name], start[k][name]) for name in convs)
    assert not all(torch.equal(start[0][name], start[1][name]) for name in convs)
    # Each fold's manifest row says where it started: the folder, its fold's sha256, steps and data, so a fold
    # continued over several runs keeps its history; a third run from the second nests the first's record.
    rows = json.loads((second / "manifest.json").read_text())["folds"]
    first_rows = json.loads((first / "manifest.json").read_text())["folds"]
    for row, first_row in zip(rows, first_rows):
        start_record = row["initialised_from"]
        assert start_record["from"] == str(first.resolve()) and start_record["fold"] == row["fold"]
        assert start_record["sha256"] == first_row["sha256"] and start_record["steps"] == first_row["steps"]
        assert start_record["data"]["phantoms"]["seed"] == 45
        assert "initialised_from" not in first_row and "initialised_from" not in start_record
    third = tmp_path / "third"
    assert python_cli(*args, "--out", str(third), "--init-from", str(second), "--lr", "0").returncode == 0
    chained = json.loads((third / "manifest.json").read_text())["folds"][1]["initialised_from"]
    assert chained["from"] == str(second.resolve()) and chained["initialised_from"] == rows[1]["initialised_from"]
    shutil.rmtree(third)
    # A folder without the fold asked for stops the run before anything is prepared or trained.
    (first / "fold_1.safetensors").unlink()
    broken = python_cli(*args, "--out", str(tmp_path / "third"), "--init-from", str(first))
    assert broken.returncode == 2 and "fold_1.safetensors" in broken.stderr.splitlines()[-1]
    assert not (tmp_path / "third").exists()
    nowhere = python_cli(*args, "--out", str(tmp_path / "third"), "--init-from", str(tmp_path / "nowhere"))
    assert nowhere.returncode == 2 and "no such file or weights folder" in nowhere.stderr.splitlines()[-1]


def test_training_on_phantoms_made_in_memory_runs_without_simpleitk(tmp_path):
    """A lent GPU's image lacks SimpleITK, and its wheel takes the room of four carried width-16 folds: training
    on in-memory phantoms must neither import it nor need it (a stub that refuses to import stands in)."""
    import os
    import subprocess
    import sys

    from .helpers import ROOT

    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "SimpleITK.py").write_text("raise ImportError('SimpleITK is absent on this machine')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'stub'}{os.pathsep}{ROOT}"}
    refused = subprocess.run([sys.executable, "-c", "import SimpleITK"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "absent on this machine" in refused.stderr  # the stub is in force
    out = tmp_path / "w"
    done = subprocess.run([sys.executable, "-m", "app", "train", "--phantoms", "10", "--phantom-size", "64,64,48",
                           "--out", str(out), "--width", "4", "--fold", "2", "--stage-steps", "1,1,2", "--batch", "1",
                           "--device", "cpu", "--val-cases", "1", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert load_ensemble(out)[0].fold_numbers() == [2]


def _as_tensors(case: TrainingCase, device=None) -> TrainingCase:
    """Stands in for `to_device` where CI has no GPU: the case's arrays as (CPU) tensors, the image float16."""
    return TrainingCase(case.case_id, torch.as_tensor(np.asarray(case.image, np.float16)),
                        torch.as_tensor(case.target), case.centres, torch.as_tensor(case.offset))


def test_training_cases_stay_on_the_host_when_the_gpu_cannot_hold_them(cases, monkeypatch, caplog):
    """Judged from the first case's size times the run's cases against the GPU's free memory (simulated
    here: no GPU in CI); a set that does not fit stays on the host, named in a warning, and trains the same."""
    gib = 2**30
    monkeypatch.setattr(app.train, "to_device", _as_tensors)
    for free, resident in ((80 * gib, True), (1000, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * gib))
        prepared = PreparedCases(torch.device("cuda"), total_cases=1251)
        data = prepared.training_data(cases[:2])
        assert prepared.resident is resident
        assert all(isinstance(c.image, torch.Tensor) is resident for c in data)
    assert "the 1251 training cases need about" in caplog.text and "stay on the host" in caplog.text
    images, targets = sample_patches(data, 0, 3, np.random.default_rng(0))
    assert images.shape == (3, 4, *PATCH) and targets.shape == (3, *PATCH)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_a_fold_trains_on_a_real_gpu_with_its_cases_resident_or_left_on_the_host(cases, tmp_path):
    cfg = replace(TINY, device="cuda", stage_steps=(2, 2, 2), validate_every=6)
    for resident in (True, False):
        prepared = PreparedCases(torch.device("cuda"), total_cases=4, resident=resident)
        result = train_fold(cfg, cases[:2], cases[3:], tmp_path / str(resident), 0, False, prepared=prepared)
        assert result.steps == 6 and np.isfinite(result.history[-1]["loss"])
        assert all(isinstance(c.image, torch.Tensor) is resident for c in prepared.cases.values())


def test_a_gpu_that_runs_out_of_memory_while_cases_move_sends_them_all_back(cases, monkeypatch, caplog):
    moved = []

    def to_device(case, device):  # the third case does not fit
        if len(moved) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        moved.append(case.case_id)
        return _as_tensors(case)

    monkeypatch.setattr(app.train, "to_device", to_device)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    prepared = PreparedCases(torch.device("cuda"), total_cases=4, resident=True)
    data = prepared.training_data(cases[:3])
    assert prepared.resident is False and moved == [c.case_id for c in cases[:2]]
    assert not any(isinstance(c.image, torch.Tensor) for c in data)
    assert "ran out of memory after 2 training cases" in caplog.text
    assert prepared.training_data(cases[3:]) == [prepared.cases[cases[3].case_id]]  # the next fold's: host
    images, *_ = _batch(data, (0, 1), 2, np.random.default_rng(0), torch.device("cpu"))
    assert images.dtype == torch.float32 and images.shape[0] == 4


def test_a_host_that_cannot_hold_the_cases_is_told_to_use_a_cache(cases, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(app.train, "physical_memory", lambda: 2**20)
    PreparedCases(torch.device("cpu"), total_cases=10).training_data(cases[:1])
    assert "pass --cache DIR" in caplog.text
    caplog.clear()
    PreparedCases(torch.device("cpu"), total_cases=10, cache_dir=tmp_path).training_data(cases[:1])
    assert caplog.text == ""  # memory-mapped: the host's memory is not what holds them


def test_a_training_case_stored_in_another_orientation_is_prepared_as_brats_stores_it(cases, tmp_path):
    """Prediction turns such a case to BraTS's storage, so training must learn that storage too."""
    import SimpleITK as sitk

    turned = tmp_path / "TURNED"
    turned.mkdir()
    source = cases[0].reference.parent
    for path in source.iterdir():
        image = sitk.PermuteAxes(sitk.Flip(sitk.ReadImage(str(path)), [False, True, False]), [1, 2, 0])
        sitk.WriteImage(image, str(turned / path.name.replace(source.name, "TURNED")))
    [case] = find_cases(turned).cases
    assert sitk.ReadImage(str(case.reference)).GetSize() != sitk.ReadImage(str(cases[0].reference)).GetSize()
    ours, brats = prepare_case(case), prepare_case(cases[0])
    assert np.array_equal(ours.image, brats.image) and np.array_equal(ours.target, brats.target)
