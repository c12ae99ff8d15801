"""The main job through ./run.sh as a subprocess, on real NIfTI cases in every layout."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app.cli import _mlcube_to_predict, build_parser, postprocess_config
from app.conventions import Layout, Modality, from_file_labels
from app.io import find_cases
from app.options import MIN_ISLAND_VOXELS, EdemaRelabel, EdemaSplit, KeepLargest
from app.postprocess import PostprocessConfig, drop_core_islands, drop_doubtful_components, fill_enclosed_core
from app.weights import read_manifest, write_manifest

from .helpers import python_cli, random_weights, relabel_edema, run_cli, small_cases


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return random_weights(tmp_path_factory.mktemp("weights"), folds=2)


def _check_outputs(input_dir: Path, output_dir: Path, expected_labels: set[int]):
    cases = find_cases(input_dir).cases
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(f"{c.case_id}.nii.gz" for c in cases)
    for case in cases:
        out = sitk.ReadImage(str(output_dir / f"{case.case_id}.nii.gz"))
        ref = sitk.ReadImage(str(case.reference))
        assert out.GetPixelID() == sitk.sitkUInt8
        assert out.GetSize() == ref.GetSize()
        assert out.GetSpacing() == ref.GetSpacing()
        assert out.GetOrigin() == ref.GetOrigin()
        assert out.GetDirection() == ref.GetDirection()
        assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) <= expected_labels


@pytest.mark.parametrize(
    "layout, labels",
    [(Layout.BRATS2023, {0, 1, 2, 3}), (Layout.BRATS2018, {0, 1, 2, 4}), (Layout.TOOLKIT, {0, 1, 2, 4})],
)
def test_run_sh_segments_each_layout(tmp_path, weights, layout, labels):
    small_cases(tmp_path / "in", 2, layout=layout)
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights))
    assert result.returncode == 0, result.stderr
    _check_outputs(tmp_path / "in", tmp_path / "out", labels)
    assert result.stderr.count(": ok ") == 2
    assert result.stderr.count(": started") == 2  # stderr is not a terminal: a line as each case starts


def test_labels_flag_overrides_convention_and_report_is_written(tmp_path, weights):
    small_cases(tmp_path / "in", 1, layout=Layout.BRATS2023)
    report = tmp_path / "report.json"
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
                     "--labels", "2018", "--report", str(report), "--tiling", "paper", "--no-postprocess")
    assert result.returncode == 0, result.stderr
    _check_outputs(tmp_path / "in", tmp_path / "out", {0, 1, 2, 4})
    data = json.loads(report.read_text())
    assert data["succeeded"] == 1 and data["failed"] == 0
    assert data["cases"][0]["status"] == "ok" and data["cases"][0]["seconds"] > 0


def test_core_filling_doubtful_components_then_islands_end_the_post_processing(tmp_path, weights):
    """Steps 4, 5 and 6 are the last three and each can be switched off: the default output is step 6 applied
    to the output without it, which is step 5 applied to the output without either (with the probabilities
    predict saved), which is step 4 applied to the output without any."""
    small_cases(tmp_path / "in", 1)
    [case] = find_cases(tmp_path / "in").cases
    outputs = {}
    no_islands = ["--min-island-voxels", "0"]
    runs = (("default", []), ("no_islands", no_islands),
            ("kept", [*no_islands, "--keep-doubtful-components", "--save-probabilities", str(tmp_path / "p")]),
            ("unfilled", [*no_islands, "--keep-doubtful-components", "--no-core-filling"]))
    for name, flags in runs:
        result = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / name), "--weights", str(weights),
                         "--bias-correction", "none", *flags)
        assert result.returncode == 0, result.stderr
        path = tmp_path / name / f"{case.case_id}.nii.gz"
        outputs[name] = from_file_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    t1c = sitk.GetArrayFromImage(sitk.ReadImage(str(case.modalities[Modality.T1C])))
    saved = sitk.ReadImage(str(tmp_path / "p" / f"{case.case_id}_probabilities.nii.gz"))
    tumour = sitk.GetArrayFromImage(saved)[..., 0]  # component 0: task 1's tumour probability
    np.testing.assert_array_equal(outputs["kept"], fill_enclosed_core(outputs["unfilled"], t1c != 0))
    np.testing.assert_array_equal(outputs["no_islands"], drop_doubtful_components(outputs["kept"], tumour))
    np.testing.assert_array_equal(outputs["default"], drop_core_islands(outputs["no_islands"], MIN_ISLAND_VOXELS))


@pytest.mark.parametrize("flags, expected", [
    ([], PostprocessConfig()),
    (["--edema-relabel", "paper"], PostprocessConfig(edema_relabel=EdemaRelabel.PAPER)),
    (["--no-edema-relabel"], PostprocessConfig(edema_relabel=EdemaRelabel.OFF)),
    (["--edema-split", "dark-tail"], PostprocessConfig(edema_split=EdemaSplit.DARK_TAIL)),
    (["--edema-relabel", "paper", "--no-edema-relabel"], PostprocessConfig(edema_relabel=EdemaRelabel.OFF)),
    (["--no-small-component-removal", "--min-et-voxels", "50", "--no-core-filling"],
     PostprocessConfig(remove_small_components=False, min_enhancing_voxels=50, fill_enclosed_core=False)),
    (["--keep-doubtful-components"], PostprocessConfig(drop_doubtful_components=False)),
    (["--keep-largest", "always"], PostprocessConfig(keep_largest=KeepLargest.ALWAYS)),
    (["--keep-largest", "when-none-sure"], PostprocessConfig(keep_largest=KeepLargest.WHEN_NONE_SURE)),
    (["--keep-largest", "most-core"], PostprocessConfig()),
    (["--min-island-voxels", "0"], PostprocessConfig(min_island_voxels=0)),
    (["--min-island-voxels", "100"], PostprocessConfig(min_island_voxels=100)),
    (["--et-check-voxels", "0"], PostprocessConfig(enhancement_check_voxels=0)),
    (["--et-check-voxels", "2000", "--min-et-enhancement", "0.8"],
     PostprocessConfig(enhancement_check_voxels=2000, min_enhancement=0.8)),
    (["--no-postprocess", "--edema-relabel", "paper"], PostprocessConfig.off()),
])
def test_postprocess_flags_make_the_config(flags, expected):
    args = build_parser().parse_args(["predict", "--input", "in", "--output", "out", *flags])
    assert postprocess_config(args) == expected


@pytest.mark.parametrize("written, expected", [("[1, 1.25]", (1.0, 1.25)), ("'0.8,1'", (0.8, 1.0)), (None, (1.0,))])
def test_mlcube_scales_become_the_scales_flag(tmp_path, written, expected):
    params = tmp_path / "parameters.yaml"
    params.write_text("" if written is None else f"scales: {written}\n")
    infer = build_parser().parse_args(["infer", "--data_path", "d", "--output_path", "o",
                                       "--parameters_file", str(params)])
    assert _mlcube_to_predict(infer).scales == expected


def test_mlcube_form_and_parameters_file(tmp_path, weights):
    small_cases(tmp_path / "data", 1)
    params = tmp_path / "parameters.yaml"
    params.write_text("folds: [1]\nscales: [1, 1.25]\ntiling: fast\nprecision: fp32\nedema_relabel: paper\n"
                      "edema_split: dark-tail\nkeep_largest: always\nlabels: '2018'\n")
    result = run_cli("infer", f"--data_path={tmp_path / 'data'}", f"--output_path={tmp_path / 'preds'}",
                     f"--parameters_file={params}", "--weights", str(weights))
    assert result.returncode == 0, result.stderr
    _check_outputs(tmp_path / "data", tmp_path / "preds", {0, 1, 2, 4})
    params.write_text("bogus: 1\n")
    bad = run_cli("infer", f"--data_path={tmp_path / 'data'}", f"--output_path={tmp_path / 'p2'}",
                  f"--parameters_file={params}", "--weights", str(weights))
    assert bad.returncode == 2 and "unknown keys" in bad.stderr
    params.write_text("edema_relabel: always\n")
    bad = run_cli("infer", f"--data_path={tmp_path / 'data'}", f"--output_path={tmp_path / 'p3'}",
                  f"--parameters_file={params}", "--weights", str(weights))
    assert bad.returncode == 2 and "--edema-relabel" in bad.stderr


def test_shards_split_the_cohort_without_overlap(tmp_path, weights):
    small_cases(tmp_path / "in", 3)
    outputs = []
    for shard, ahead in (("0/2", "2"), ("1/2", "0")):  # a shard of many cases is where --prepare-ahead pays
        out = tmp_path / f"out{shard[0]}"
        result = run_cli("--input", str(tmp_path / "in"), "--output", str(out), "--weights", str(weights),
                         "--shard", shard, "--folds", "0", "--prepare-ahead", ahead)
        assert result.returncode == 0, result.stderr
        outputs.append({p.name for p in out.iterdir()})
    assert len(outputs[0]) == 2 and len(outputs[1]) == 1 and not outputs[0] & outputs[1]


@pytest.mark.parametrize("scales", ["1", "1,1.25"])
def test_save_probabilities_writes_seven_components(tmp_path, weights, scales):
    small_cases(tmp_path / "in", 1)
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
                     "--save-probabilities", str(tmp_path / "probs"), "--scales", scales)
    assert result.returncode == 0, result.stderr
    [prob] = list((tmp_path / "probs").iterdir())
    image = sitk.ReadImage(str(prob))
    assert image.GetNumberOfComponentsPerPixel() == 7
    [flair] = (tmp_path / "in").glob("*/*-t2f.nii.gz")
    reference = sitk.ReadImage(str(flair))
    assert image.GetOrigin() == reference.GetOrigin() and image.GetDirection() == reference.GetDirection()
    array = sitk.GetArrayFromImage(image)
    assert array.min() >= 0 and array.max() <= 1.0001
    # Task 2's five class probabilities sum to one inside the processed crop.
    sums = array[..., 1:6].sum(-1)
    assert np.allclose(sums[sums > 0], 1, atol=1e-3)


def test_usage_errors_exit_2(tmp_path, weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [
        (["--input", str(empty)], "no BraTS case found"),
        (["--input", str(tmp_path / "missing")], "does not exist"),
        (["--input", str(empty), "--folds", "7"], "fold 7 is not in"),
        (["--input", str(empty), "--shard", "3/2"], "--shard"),
        (["--input", str(empty), "--folds", "0,x"], "argument --folds: needs comma-separated integers"),
        (["--input", str(empty), "--folds", "0,0"], "argument --folds: needs distinct numbers"),
        (["--input", str(empty), "--tile", "16,32"], "argument --tile: needs 3 comma-separated integers"),
        (["--input", str(empty), "--min-et-voxels", "-1"], "argument --min-et-voxels: needs an integer >= 0"),
        (["--input", str(empty), "--threads", "-3"], "argument --threads: needs an integer >= 0"),
        (["--input", str(empty), "--prepare-ahead", "-1"], "argument --prepare-ahead: needs an integer >= 0"),
        (["--input", str(empty), "--scales", "1,3"], "argument --scales: needs comma-separated numbers: scales must"),
        (["--input", str(empty), "--scales", "1,x"], "argument --scales: needs comma-separated numbers"),
    ]:
        result = run_cli(*args, "--output", str(tmp_path / "out"), "--weights", str(weights))
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
    bad_flag = run_cli("--input", str(empty), "--output", str(tmp_path / "o"), "--tiling", "slow")
    assert bad_flag.returncode == 2 and "invalid choice" in bad_flag.stderr


def test_bad_counts_sizes_and_folders_of_phantoms_and_train_are_usage_errors(tmp_path):
    for args, message in [
        (["phantoms", "--out", str(tmp_path / "p"), "--n", "1", "--size", "128,128"], "argument --size: needs 3"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "w"), "--stage-steps", "5,5"],
         "argument --stage-steps: needs 3"),
        (["phantoms", "--out", str(tmp_path / "p"), "--n", "0"], "argument --n: needs an integer >= 1"),
        (["phantoms", "--out", str(tmp_path / "p"), "--n", "1", "--size", "64,64,8"],
         "argument --size: needs 3 comma-separated integers >= 16"),
        (["train", "--phantoms", "0", "--out", str(tmp_path / "w")], "argument --phantoms: needs an integer >= 1"),
        (["train", "--phantoms", "2", "--width", "0", "--out", str(tmp_path / "w")],
         "argument --width: needs an integer >= 1"),
        (["train", "--phantoms", "2", "--validate-every", "0", "--out", str(tmp_path / "w")],
         "argument --validate-every: needs an integer >= 1"),
        (["train", "--phantoms", "2", "--lr", "-1", "--out", str(tmp_path / "w")],
         "argument --lr: needs a number >= 0"),
        (["train", "--phantoms", "2", "--momentum", "1.5", "--out", str(tmp_path / "w")],
         "argument --momentum: needs a number in [0, 1]"),
        (["train", "--phantoms", "2", "--seed", "-1", "--out", str(tmp_path / "w")],
         "argument --seed: needs an integer >= 0"),
        (["phantoms", "--out", str(tmp_path / "p"), "--n", "1", "--seed", "-1"],
         "argument --seed: needs an integer >= 0"),
        (["train", "--phantoms", "2", "--phantom-size", "8,64,64", "--out", str(tmp_path / "w")],
         "argument --phantom-size: needs 3 comma-separated integers >= 16"),
    ]:
        result = python_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "w").exists()
    (tmp_path / "file").write_text("not a folder")
    result = python_cli("phantoms", "--out", str(tmp_path / "file"), "--n", "1", "--size", "32,32,32")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: cannot write the phantoms to {tmp_path / 'file'}: ")
    file = tmp_path / "file"
    for args in (["train", "--phantoms", "2", "--out", str(file)],
                 ["average", "--base", "weights", "--tuned", "weights", "--alpha", "0.5", "--out", str(file)],
                 ["combine", "--base", "weights", "--replacement", "weights", "--out", str(file)]):
        result = python_cli(*args)
        assert result.returncode == 2 and result.stderr.strip() == f"error: --out {file} is a file, not a folder"


def test_training_data_that_cannot_be_used_is_a_one_line_error(tmp_path):
    """A missing or empty --data folder is a usage error (2); a training case that cannot be read stops the
    run with its case and file named (1), also when it is read in a preparation worker process."""
    (tmp_path / "empty").mkdir()
    for data, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no cases with ground")]:
        result = python_cli("train", "--data", str(data), "--out", str(tmp_path / "w"))
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --data {data}: ") and message in last
        assert "Traceback" not in result.stderr
    [bad] = small_cases(tmp_path / "data", 1, seed=26)
    flair = next(bad.glob("*-t2f.nii.gz"))
    image = sitk.ReadImage(str(flair))
    image.SetOrigin((5.0, 5.0, 5.0))
    sitk.WriteImage(image, str(flair), True)
    result = python_cli("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "w"),
                        "--cache", str(tmp_path / "cache"), "--prepare-only", "--prepare-workers", "2")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: case {bad.name} [") and "geometry differs" in last and "origin" in last
    assert "Traceback" not in result.stderr


def test_a_training_label_the_model_has_no_class_for_names_its_case_and_file(tmp_path):
    """A 2023-named truth with label 4 (BraTS 2024's resection cavity) stops training with a one-line error,
    never read as ET; in a 2018-named case 4 is ET and the case prepares."""
    [cavity] = small_cases(tmp_path / "data2023", 1, seed=26)
    [seg] = cavity.glob("*-seg.nii.gz")
    relabel_edema(seg, 4, every=2)
    result = python_cli("train", "--data", str(tmp_path / "data2023"), "--out", str(tmp_path / "w"),
                        "--cache", str(tmp_path / "cache"), "--prepare-only")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: case {cavity.name} [{seg}]: labels [4]") and "resection cavity" in last
    assert "--truth-recode 4:0" in last and "Traceback" not in result.stderr
    recoded = python_cli("train", "--data", str(tmp_path / "data2023"), "--out", str(tmp_path / "w"),
                         "--cache", str(tmp_path / "cache"), "--prepare-only", "--truth-recode", "4:0")
    assert recoded.returncode == 0 and "prepared 1 case(s)" in recoded.stderr, recoded.stderr
    [target] = (tmp_path / "cache").glob("*.target.npy")  # cached under a name that says how it was read
    assert target.name == f"{cavity.name}.recoded-4to0.target.npy"
    again = python_cli("train", "--data", str(tmp_path / "data2023"), "--out", str(tmp_path / "w"),
                       "--cache", str(tmp_path / "cache"), "--prepare-only")
    assert again.returncode == 1 and "labels [4]" in again.stderr  # the re-coded arrays never stand in
    for flags, message in [(["--data", str(tmp_path / "data2023"), "--truth-recode", "4"], "FROM:TO pairs"),
                           (["--data", str(tmp_path / "data2023"), "--truth-recode", "4:0,4:1"], "a label twice"),
                           (["--phantoms", "2", "--truth-recode", "4:0"], "phantoms carry the model's own labels")]:
        refused = python_cli("train", *flags, "--out", str(tmp_path / "w"))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    small_cases(tmp_path / "data2018", 1, seed=26, layout=Layout.BRATS2018)
    result = python_cli("train", "--data", str(tmp_path / "data2018"), "--out", str(tmp_path / "w"),
                        "--cache", str(tmp_path / "cache"), "--prepare-only")
    assert result.returncode == 0 and "prepared 1 case(s)" in result.stderr, result.stderr


def test_a_training_case_without_a_recognised_ground_truth_is_left_out_by_name(tmp_path):
    """BraTS 2020's case 355 ships its truth as W39_1998.09.19_Segm.nii: training goes on without it and
    says so, naming the case."""
    misnamed, kept = small_cases(tmp_path / "data", 2, seed=27, layout=Layout.BRATS2018)
    [seg] = misnamed.glob("*_seg.nii.gz")
    seg.rename(misnamed / "W39_1998.09.19_Segm.nii.gz")
    (tmp_path / "data" / "extra").mkdir()  # and files outside every case, under names no layout reads
    shutil.copy(kept / f"{kept.name}_flair.nii.gz", tmp_path / "data" / "extra" / "BraTS20_0000.nii.gz")
    result = python_cli("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "w"),
                        "--cache", str(tmp_path / "cache"), "--prepare-only")
    assert result.returncode == 0 and "prepared 1 case(s)" in result.stderr, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "no ground truth" in line]
    assert warning.endswith(f"left out of training: {misnamed.name}") and kept.name not in warning
    [unread] = [line for line in result.stderr.splitlines() if "outside every case" in line]
    assert "1 NIfTI file(s) outside every case were not read" in unread and "extra/BraTS20_0000.nii.gz" in unread


def test_a_training_case_read_with_a_warning_is_named_in_the_log(tmp_path):
    """A training case is read as prediction reads it, and its warnings (here a T1c that is a copy of the T1)
    reach the log with its name; the case still prepares."""
    [copied] = small_cases(tmp_path / "data", 1, seed=28)
    shutil.copy(next(copied.glob("*-t1n.nii.gz")), next(copied.glob("*-t1c.nii.gz")))
    result = python_cli("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "w"),
                        "--cache", str(tmp_path / "cache"), "--prepare-only")
    assert result.returncode == 0 and "prepared 1 case(s)" in result.stderr, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "hold the same image" in line]
    assert f"case {copied.name} [{copied}]: t1 and t1c hold the same image" in warning


def test_side_outputs_inside_the_output_folder_are_refused(tmp_path, weights):
    small_cases(tmp_path / "in", 1)
    out = tmp_path / "out"
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(out), "--weights", str(weights),
                     "--report", str(out / "report.json"))
    assert result.returncode == 2 and "inside the output folder" in result.stderr


@pytest.mark.parametrize(("flag", "kind"), [("--qc", "file"), ("--save-probabilities", "file"), ("--report", "folder")])
def test_side_outputs_that_cannot_be_written_stop_before_any_case(tmp_path, weights, flag, kind):
    """Found at the start, not after every case has run (the report is written last)."""
    small_cases(tmp_path / "in", 1)
    target = tmp_path / "side"
    target.mkdir() if kind == "folder" else target.write_text("x")
    out = tmp_path / "out"
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(out), "--weights", str(weights), flag,
                     str(target))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith(f"error: {flag}") and "started" not in result.stderr
    assert not any(out.iterdir())


def test_first_run_messages_name_the_flag_and_the_defaults(tmp_path):
    bad_tile = python_cli("predict", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--tile", "25,48,48")
    assert bad_tile.returncode == 2 and "--tile" in bad_tile.stderr and "multiples of 8" in bad_tile.stderr
    help_text = run_cli("--help")
    assert help_text.returncode == 0 and "run.sh supplies --input /input --output /output" in help_text.stdout
    train_help = python_cli("train", "--help")
    assert "(default: 32)" in train_help.stdout


def test_evaluate_joins_the_confidence_predict_reported_and_says_how_it_tracked_the_dice(tmp_path, weights):
    """predict --report, then evaluate --predict-report: each case's row carries the confidence and warning
    the report gave it, and the summary line counts the poor cases the warning caught from those rows (a
    case the report lacks is named as such); a file that is not such a report stops evaluate before scoring."""
    cases = small_cases(tmp_path / "in", 3, seed=29)
    report = tmp_path / "report.json"
    result = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", str(weights),
                     "--report", str(report))
    assert result.returncode == 0, result.stderr
    predicted = {c["case_id"]: c for c in json.loads(report.read_text())["cases"]}
    trimmed = json.loads(report.read_text())
    trimmed["cases"] = [c for c in trimmed["cases"] if c["case_id"] != cases[2].name]
    (tmp_path / "trimmed.json").write_text(json.dumps(trimmed))
    result = python_cli("evaluate", "--pred", str(tmp_path / "out"), "--gt", str(tmp_path / "in"), "--csv",
                        str(tmp_path / "e.csv"), "--predict-report", str(tmp_path / "trimmed.json"), "--poor", "1")
    assert result.returncode == 0, result.stderr
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "e.csv"))}
    for case in cases[:2]:
        row, reported = rows[case.name], predicted[case.name]
        assert float(row["confidence"]) == pytest.approx(reported["confidence"])
        assert float(row["warned"]) == float("low confidence: review this segmentation" in reported["warnings"])
    assert rows[cases[2].name]["confidence"] == "nan"
    warned = sum(float(rows[c.name]["warned"]) for c in cases[:2])
    [line] = [line for line in result.stdout.splitlines() if line.startswith("confidence from the predict report")]
    assert f"on 2 case(s): the low-confidence warning caught {warned:.0f} of 2 poor case(s) (mean Dice under 1)" in line
    assert line.endswith("; 1 scored case(s) have no confidence in the report")
    # The warnings' table: every case of the trimmed report is in the row of each code it carries, and the
    # (none) row holds those without any; poor is every case at --poor 1.
    table = result.stdout.split("warnings from the predict report (poor: mean Dice under 1):\n")[1].splitlines()
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table[2:] if row.startswith("| ")]
    tallies = {code: int(cases) for code, cases, *_ in cells}
    carried = [predicted[c.name]["warning_codes"] for c in cases[:2]]
    assert tallies.pop("(none)") == sum(not codes for codes in carried)
    assert tallies == {code: sum(code in codes for codes in carried) for codes in carried for code in codes}
    (tmp_path / "bad.json").write_text('{"succeeded": 1}')
    for bad, message in [(tmp_path / "bad.json", "is not a report that predict --report writes"),
                         (tmp_path / "e.csv", "is not JSON"), (tmp_path / "absent.json", "No such file")]:
        result = python_cli("evaluate", "--pred", str(tmp_path / "out"), "--gt", str(tmp_path / "in"),
                            "--predict-report", str(bad))
        assert result.returncode == 2 and message in result.stderr and "| mean |" not in result.stdout, result.stderr
        assert result.stderr.strip() == result.stderr.strip().splitlines()[0]


def test_evaluate_with_no_matching_prediction_is_a_usage_error(tmp_path):
    small_cases(tmp_path / "gt", 1)
    (tmp_path / "pred").mkdir()
    result = python_cli("evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"))
    assert result.returncode == 2 and "no prediction" in result.stderr


def test_evaluate_outputs_that_cannot_be_written_are_usage_errors(tmp_path):
    small_cases(tmp_path / "gt", 1)
    (tmp_path / "pred").mkdir()
    (tmp_path / "a_file").write_text("x")
    for flag, target, message in [("--csv", tmp_path, "is a folder"), ("--qc", tmp_path / "a_file", "is a file")]:
        result = python_cli("evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), flag,
                            str(target))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == result.stderr.strip().splitlines()[0] and message in result.stderr


def test_run_sh_segments_with_an_ensemble_of_two_widths(tmp_path):
    """A combined weights folder (`python3 -m app combine`: fold 1 of width 4 in place of a width-2 fold 1)
    goes through the whole job, and its replaced fold is the one that runs (the probabilities differ from the
    base's)."""
    small_cases(tmp_path / "in", 1)
    base = random_weights(tmp_path / "base", width=2, folds=2)
    wide = random_weights(tmp_path / "wide", width=4, folds=2, seed=9)
    raw = json.loads((wide / "manifest.json").read_text())
    write_manifest(wide, raw["variant"], 4, [f for f in raw["folds"] if f["fold"] == 1])
    combined = tmp_path / "combined"
    done = python_cli("combine", "--base", str(base), "--replacement", str(wide), "--out", str(combined))
    assert done.returncode == 0, done.stderr
    assert [(f.fold, f.width) for f in read_manifest(combined).folds] == [(0, 2), (1, 4)]
    probabilities = {}
    for name, folder in (("base", base), ("combined", combined)):
        result = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / f"out_{name}"), "--weights",
                         str(folder), "--save-probabilities", str(tmp_path / f"p_{name}"))
        assert result.returncode == 0, result.stderr
        _check_outputs(tmp_path / "in", tmp_path / f"out_{name}", {0, 1, 2, 3})
        [path] = (tmp_path / f"p_{name}").iterdir()
        probabilities[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert not np.allclose(probabilities["base"], probabilities["combined"])
