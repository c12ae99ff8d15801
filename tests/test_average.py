"""`python3 -m app average`: fold-by-fold interpolation of two weights folders (WiSE-FT), as the shipped
fifteenth-round ensemble was made; `python3 -m app combine`: some folds of a folder replaced by another's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from app.weights import (
    WeightsError,
    average_ensembles,
    combine_ensembles,
    load_ensemble,
    read_manifest,
    write_manifest,
)
from tests.helpers import python_cli, random_weights


def _with_scores(folder):
    """Give each fold record a score, as trained folders have, to check they travel to the average."""
    raw = json.loads((folder / "manifest.json").read_text())
    folds = [{"fold": f["fold"], "file": f["file"], "validation_dice": {"WT": 0.5 + f["fold"]}} for f in raw["folds"]]
    write_manifest(folder, raw["variant"], raw["width"], folds, {"training": {"lr": 0.002}})
    return folder


def test_cli_average_interpolates_every_tensor_and_records_both_inputs(tmp_path):
    base = random_weights(tmp_path / "base", seed=0)
    tuned = _with_scores(random_weights(tmp_path / "tuned", seed=10))
    out = tmp_path / "mixed"
    done = python_cli("average", "--base", str(base), "--tuned", str(tuned), "--alpha", "0.25", "--out", str(out))
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    assert manifest.fold_numbers() == [0, 1]
    for fold in (0, 1):
        b = load_file(str(base / f"fold_{fold}.safetensors"))
        t = load_file(str(tuned / f"fold_{fold}.safetensors"))
        m = load_file(str(out / f"fold_{fold}.safetensors"))
        assert m.keys() == t.keys()
        floats = [k for k in m if m[k].is_floating_point()]
        assert any("running_var" in k for k in floats)  # BatchNorm statistics are averaged too
        for key in floats:
            torch.testing.assert_close(m[key], 0.75 * b[key] + 0.25 * t[key])
        assert any(not torch.equal(m[k], b[k]) for k in floats)  # the inputs differ, so the result does
    raw = manifest.raw
    assert raw["training"] == {"lr": 0.002}
    assert raw["folds"][1]["validation_dice"] == {"WT": 1.5}
    assert raw["averaged"]["alpha"] == 0.25
    tuned_shas = {f.fold: f.sha256 for f in read_manifest(tuned).folds}
    assert [s["tuned_sha256"] for s in raw["averaged"]["sources"]] == [tuned_shas[0], tuned_shas[1]]
    _, models = load_ensemble(out)  # sha256 sums verified, strict load
    assert len(models) == 2


@pytest.mark.parametrize("alpha, expected", [(0.0, "base"), (1.0, "tuned")])
def test_alpha_at_the_ends_gives_one_input_back(tmp_path, alpha, expected):
    folders = {"base": random_weights(tmp_path / "base", seed=0), "tuned": random_weights(tmp_path / "tuned", seed=5)}
    average_ensembles(folders["base"], folders["tuned"], tmp_path / "out", alpha)
    mixed = load_file(str(tmp_path / "out" / "fold_0.safetensors"))
    source = load_file(str(folders[expected] / "fold_0.safetensors"))
    for key, tensor in source.items():
        if tensor.is_floating_point():
            assert torch.equal(mixed[key], tensor), key


def test_cli_refuses_networks_of_different_width_with_one_line_and_writes_nothing(tmp_path):
    base = random_weights(tmp_path / "base", width=4)
    tuned = random_weights(tmp_path / "tuned", width=2)
    out = tmp_path / "mixed"
    done = python_cli("average", "--base", str(base), "--tuned", str(tuned), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "width differs" in done.stderr
    assert not (out / "manifest.json").exists()


def test_refuses_bad_alpha_same_output_and_tampered_input(tmp_path):
    base = random_weights(tmp_path / "base")
    tuned = random_weights(tmp_path / "tuned", seed=3)
    with pytest.raises(ValueError, match="alpha"):
        average_ensembles(base, tuned, tmp_path / "out", 1.5)
    with pytest.raises(ValueError, match="differ from both inputs"):
        average_ensembles(base, tuned, base, 0.5)
    (tuned / "fold_1.safetensors").write_bytes((tuned / "fold_0.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="sha256"):
        average_ensembles(base, tuned, tmp_path / "out", 0.5)


def test_refuses_a_fold_missing_from_base(tmp_path):
    base = random_weights(tmp_path / "base", folds=1)
    tuned = random_weights(tmp_path / "tuned", folds=2, seed=3)
    with pytest.raises(WeightsError, match="fold 1 is not in"):
        average_ensembles(base, tuned, tmp_path / "out", 0.5)


def test_cli_combine_puts_wider_folds_in_place_and_loads_each_at_its_width(tmp_path):
    base = random_weights(tmp_path / "base", width=2, folds=3)
    wide = random_weights(tmp_path / "wide", width=4, folds=3, seed=7)
    raw = json.loads((wide / "manifest.json").read_text())
    write_manifest(wide, raw["variant"], 4, [f for f in raw["folds"] if f["fold"] == 1], {"training": {"lr": 0.01}})
    out = tmp_path / "combined"
    done = python_cli("combine", "--base", str(base), "--replacement", str(wide), "--out", str(out))
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    assert [(f.fold, f.width) for f in manifest.folds] == [(0, 2), (1, 4), (2, 2)]
    assert manifest.raw["combined"]["replaced_folds"] == [1]
    assert manifest.raw["folds"][1]["training"] == {"lr": 0.01}  # the replaced fold keeps its provenance
    assert "training" not in manifest.raw["folds"][0]
    for fold, source in ((0, base), (1, wide), (2, base)):
        assert (out / f"fold_{fold}.safetensors").read_bytes() == (source / f"fold_{fold}.safetensors").read_bytes()
    _, models = load_ensemble(out)  # sha256 sums verified, strict load at each fold's width
    assert [m.state_dict()[next(iter(m.state_dict()))].shape[0] for m in models] == [2, 4, 2]


def test_combine_refuses_another_variant_adds_missing_folds_and_keeps_each_step(tmp_path):
    base = random_weights(tmp_path / "base", folds=2)
    other = random_weights(tmp_path / "other", variant="omnet", folds=2)
    more = random_weights(tmp_path / "more", width=2, folds=3, seed=4)
    done = python_cli("combine", "--base", str(base), "--replacement", str(other), "--out", str(tmp_path / "o1"))
    assert done.returncode == 2 and "variant differs" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o1" / "manifest.json").exists()
    combine_ensembles(base, more, tmp_path / "o2")
    assert [(f.fold, f.width) for f in read_manifest(tmp_path / "o2").folds] == [(0, 2), (1, 2), (2, 2)]
    # Assembled over several runs: each combine step keeps the steps before it.
    combine_ensembles(tmp_path / "o2", base, tmp_path / "o3")
    steps = read_manifest(tmp_path / "o3").raw["combined"]
    assert steps["replacement"] == str(base) and steps["previous"]["replacement"] == str(more)
    assert "previous" not in steps["previous"]
