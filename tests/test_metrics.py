import csv
import io
import json
import shutil

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from app.conventions import LESION_RULES, Layout, LesionRule
from app.evaluation import (
    PredictedCase,
    check_confidence,
    evaluate_cases,
    print_warning_tallies,
    read_predict_report,
    tally_warnings,
)
from app.metrics import EMPTY_HD95, LESION_PENALTY_HD95, case_scores, dice, hd95, lesion_challenge, lesion_scores
from app.phantoms import generate, make_phantom

from .helpers import python_cli, relabel_edema


def test_empty_mask_rules_of_the_legacy_evaluation():
    empty = np.zeros((10, 10, 10), bool)
    full = empty.copy()
    full[3:6, 3:6, 3:6] = True
    assert dice(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(full, empty) == 0.0 and hd95(full, empty) == EMPTY_HD95 == hd95(empty, full)


def test_hd95_uses_the_spacing():
    a = np.zeros((40, 40, 40), bool)
    a[10:20, 10:20, 10:20] = True
    b = np.roll(a, 3, axis=0)  # shifted 3 voxels along z
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(7.5)


def test_sensitivity_specificity_ppv():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:6, 2:6, 2:6] = 2  # 64 voxels
    pred = np.zeros_like(truth)
    pred[2:6, 2:6, 2:4] = 2  # 32 true positives
    pred[8, 8, 8] = 2  # one false positive
    wt = case_scores(pred, truth)["WT"]
    assert wt.sensitivity == pytest.approx(0.5)
    assert wt.ppv == pytest.approx(32 / 33)
    assert wt.specificity == pytest.approx(1 - 1 / 936)


def _cube(mask: np.ndarray, corner: tuple[int, int, int], size: int) -> None:
    mask[tuple(slice(c, c + size) for c in corner)] = True


def test_lesion_wise_scores_by_hand():
    """Three lesions (two of them 3 voxels apart, so one lesion), a fourth too small to count: one found
    exactly, one missed, one false positive; the small lesion's match is no false positive."""
    truth = np.zeros((40, 40, 40), bool)
    _cube(truth, (2, 2, 2), 5)
    _cube(truth, (2, 2, 10), 5)  # 3 voxels from the first: within twice GLI's dilation of 3, one lesion
    _cube(truth, (20, 20, 20), 5)  # missed
    _cube(truth, (32, 32, 32), 3)  # 27 mm3: left out of the scores
    pred = np.zeros_like(truth)
    _cube(pred, (2, 2, 2), 5)
    _cube(pred, (2, 2, 10), 5)
    _cube(pred, (32, 32, 32), 2)  # matches the small lesion: not a false positive
    _cube(pred, (10, 30, 2), 4)  # touches nothing: a false positive
    scores = lesion_scores(pred, truth)
    assert (scores.tp, scores.fn, scores.fp) == (1, 1, 1)
    assert scores.dice == pytest.approx(1 / 3)
    assert scores.hd95 == pytest.approx(2 * LESION_PENALTY_HD95 / 3)
    # MET's rule (dilation 1, lesions up to 2 mm3 left out): the pair are two lesions, the small one counts.
    met = lesion_scores(pred, truth, rule=LESION_RULES["MET"])
    assert (met.tp, met.fn, met.fp) == (3, 1, 1)
    empty = np.zeros_like(truth)
    assert lesion_scores(empty, empty) == lesion_scores(empty, truth & False)
    assert (lesion_scores(empty, empty).dice, lesion_scores(empty, empty).hd95) == (1.0, 0.0)
    assert (lesion_scores(pred, empty).dice, lesion_scores(pred, empty).hd95) == (0.0, LESION_PENALTY_HD95)


def _lesion_scores_plainly(pred, truth, spacing, rule: LesionRule) -> tuple[float, float]:
    """The lesion-wise rule written out over whole volumes, without `lesion_scores`'s bounding boxes."""
    structure = ndimage.generate_binary_structure(3, 2)
    components = cc3d.connected_components(pred, connectivity=26)
    grown = ndimage.binary_dilation(truth, structure, iterations=rule.dilation)
    lesions = cc3d.connected_components(grown, connectivity=26) * truth
    matched, dice_sum, hd95_sum, counted = set(), 0.0, 0.0, 0
    for number in range(1, int(lesions.max()) + 1):
        lesion = lesions == number
        near = ndimage.binary_dilation(lesion, structure, iterations=rule.dilation)
        touched = [c for c in np.unique(components[near]) if c]
        matched.update(touched)
        if lesion.sum() * np.prod(spacing) > rule.max_ignored_mm3:
            counted += 1
            found = np.isin(components, touched)
            dice_sum += dice(found, lesion) if touched else 0.0
            hd95_sum += hd95(found, lesion, spacing) if touched else LESION_PENALTY_HD95
    fp = sum(c not in matched for c in range(1, int(components.max()) + 1))
    if counted + fp == 0:
        return 1.0, 0.0
    return dice_sum / (counted + fp), (hd95_sum + fp * LESION_PENALTY_HD95) / (counted + fp)


def test_lesion_wise_scores_agree_with_the_rule_written_out_over_whole_volumes():
    rng = np.random.default_rng(0)
    for trial in range(20):
        truth, pred = np.zeros((40, 50, 45), bool), np.zeros((40, 50, 45), bool)
        for mask, count, largest in ((truth, rng.integers(0, 6), 6), (pred, rng.integers(0, 4), 4)):
            for _ in range(count):
                _cube(mask, tuple(rng.integers(0, 40, 3)), int(rng.integers(1, largest)))
        pred |= ndimage.binary_dilation(truth, iterations=int(rng.integers(0, 2))) & (rng.random(truth.shape) > 0.05)
        spacing = (1.0, 1.0, 1.0) if trial % 2 else (2.0, 0.9, 1.1)
        rule = list(LESION_RULES.values())[trial % len(LESION_RULES)]
        ours = lesion_scores(pred, truth, spacing, rule)
        assert (ours.dice, ours.hd95) == pytest.approx(_lesion_scores_plainly(pred, truth, spacing, rule)), trial


def test_the_lesion_rule_follows_the_challenge_a_case_id_names(tmp_path):
    ids = ("BraTS-MEN-00004-000", "BraTS-met-00001-000", "BraTS-GLI-00000-000", "BraTS2021_00000", "BraTS-PHA-00001")
    assert [lesion_challenge(i) for i in ids] == ["MEN", "MET", "GLI", "GLI", "GLI"]
    with pytest.raises(ValueError, match=r"lesion_rule must be one of \['auto', 'GLI'"):
        evaluate_cases(tmp_path, tmp_path, lesion_rule="GBM")


def _perturbations(labels: np.ndarray):
    yield "shift", np.roll(labels, 2, axis=2)
    eroded = labels.copy()
    eroded[~ndimage.binary_erosion(labels > 0, iterations=1)] = 0
    yield "erode", eroded
    grown = labels.copy()
    grown[(ndimage.binary_dilation(labels == 3, iterations=2)) & (labels > 0)] = 3
    yield "grow ET", grown
    spurious = labels.copy()
    spurious[2:5, 2:5, 2:5] = 2
    yield "spurious blob", spurious


@pytest.mark.parametrize("spacing_xyz", [(1.0, 1.0, 1.0), (1.0, 1.2, 2.0)])
def test_agreement_with_the_official_brats_evaluator(tmp_path, spacing_xyz):
    """Dice and HD95 agree with brats-evaluation's panoptica config to 1e-3 where both are defined.

    The official package calls panoptica without a voxel spacing, so its HD95 is in voxels; on BraTS's
    1 mm isotropic grid that is mm. Its global HD95 stays in voxels even when handed a spacing, so on
    anisotropic data our HD95 computed in voxel units must match it, while `evaluate` reports mm.
    """
    panoptica = pytest.importorskip("panoptica", reason="brats-evaluation (dev dependency) is not installed")
    from importlib.resources import files

    config = files("brats_evaluation").joinpath("configs", "config_gli.yaml")
    evaluator = panoptica.Panoptica_Evaluator.load_from_config(str(config))
    compared = 0
    for index in range(2):
        truth = make_phantom(7, index, (96, 96, 64)).labels
        for name, pred in _perturbations(truth):
            paths = {}
            for role, array in (("pred", pred), ("ref", truth)):
                image = sitk.GetImageFromArray(array.astype(np.uint8))
                image.SetSpacing(spacing_xyz)
                paths[role] = tmp_path / f"{role}.nii.gz"
                sitk.WriteImage(image, str(paths[role]))
            results = evaluator.evaluate(str(paths["pred"]), str(paths["ref"]))  # the official call
            official = {k: r.to_dict(True) for k, r in results.items()}
            ours = case_scores(pred, truth, (1.0, 1.0, 1.0))
            for region in ("WT", "TC", "ET"):
                theirs = official[region.lower()]
                if np.isfinite(theirs["global_bin_dsc"]):
                    assert ours[region].dice == pytest.approx(theirs["global_bin_dsc"], abs=1e-3), (name, region)
                    compared += 1
                if np.isfinite(theirs["global_bin_hd95"]):
                    assert ours[region].hd95 == pytest.approx(theirs["global_bin_hd95"], abs=1e-3), (name, region)
                    compared += 1
    assert compared >= 40


def test_evaluate_cli_table_csv_missing_and_qc(tmp_path):
    gt = tmp_path / "gt"
    generate(gt, 2, seed=51, size=(64, 64, 48))
    pred = tmp_path / "pred"
    pred.mkdir()
    first = sorted(gt.iterdir())[0]
    seg = next(first.glob("*-seg.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(seg)), str(pred / f"{first.name}.nii.gz"))
    shutil.copy(pred / f"{first.name}.nii.gz", pred / "BraTS20_Training_355.nii.gz")  # its truth misnamed
    result = python_cli("evaluate", "--pred", str(pred), "--gt", str(gt), "--csv", str(tmp_path / "m.csv"),
                        "--qc", str(tmp_path / "qc"))
    assert result.returncode == 0, result.stderr
    assert "missing predictions" in result.stderr
    assert "predictions without a ground truth (not scored): BraTS20_Training_355\n" in result.stderr
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    by_case = {r["case"]: r for r in rows}
    assert float(by_case[first.name]["dice_WT"]) == 1.0 and float(by_case[first.name]["hd95_ET"]) == 0.0
    missing = [r for r in rows if r["case"] not in (first.name, "mean")][0]
    assert float(missing["dice_WT"]) == 0.0 and float(missing["hd95_WT"]) == EMPTY_HD95
    assert by_case["mean"]["dice_WT"] == "0.5"
    assert float(by_case[first.name]["lesion_dice_ET"]) == 1.0 and float(missing["lesion_dice_WT"]) == 0.0
    assert float(missing["lesion_fn_WT"]) >= 1 and float(missing["lesion_hd95_WT"]) == LESION_PENALTY_HD95
    assert "lesion-wise scores by BraTS 2023's rules: GLI for 2 case(s) (dilation 3," in result.stdout
    met = python_cli("evaluate", "--pred", str(pred), "--gt", str(gt), "--lesion-rule", "MET")
    assert "rules: MET for 2 case(s) (dilation 1, lesions of at most 2 mm3 left out)" in met.stdout, met.stderr
    [picture] = list((tmp_path / "qc").iterdir())
    assert picture.suffix == ".png" and sitk.ReadImage(str(picture)).GetSize()[0] > 600
    assert "| mean |" in result.stdout


def test_evaluate_scores_the_other_cases_when_one_file_is_bad(tmp_path):
    """A prediction that cannot be read, lies on another grid or holds a foreign label is scored as empty and
    named; a ground truth that cannot be read is named and not scored; the good case is scored; exit 1."""
    gt = tmp_path / "gt"
    generate(gt, 6, seed=52, size=(64, 64, 48))
    pred = tmp_path / "pred"
    pred.mkdir()
    good, truncated, shifted, foreign, bad_truth, regridded = sorted(gt.iterdir())
    truth_path = next(regridded.glob("*-seg.nii.gz"))  # its truth on a grid of its own: scored, not drawn
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 64, 64), np.uint8)), str(truth_path))
    for case in (good, truncated, shifted, foreign, bad_truth, regridded):
        shutil.copy(next(case.glob("*-seg.nii.gz")), pred / f"{case.name}.nii.gz")
    data = (pred / f"{truncated.name}.nii.gz").read_bytes()
    (pred / f"{truncated.name}.nii.gz").write_bytes(data[: len(data) // 2])
    image = sitk.ReadImage(str(pred / f"{shifted.name}.nii.gz"))
    image.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(image, str(pred / f"{shifted.name}.nii.gz"))
    truth = sitk.ReadImage(str(pred / f"{foreign.name}.nii.gz"))
    array = sitk.GetArrayFromImage(truth)
    array[0, 0, 0] = 7
    relabelled = sitk.GetImageFromArray(array)
    relabelled.CopyInformation(truth)
    sitk.WriteImage(relabelled, str(pred / f"{foreign.name}.nii.gz"))
    next(bad_truth.glob("*-seg.nii.gz")).write_bytes(b"not a NIfTI")
    result = python_cli("evaluate", "--pred", str(pred), "--gt", str(gt), "--csv", str(tmp_path / "m.csv"),
                        "--qc", str(tmp_path / "qc"))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = {truncated.name: ("unreadable NIfTI", "scored as an empty prediction"),
                shifted.name: ("origin", "scored as an empty prediction"),
                foreign.name: ("labels [7]", "scored as an empty prediction"),
                bad_truth.name: ("unreadable NIfTI", "not scored"),
                regridded.name: ("is not the ground truth's (40, 64, 64)", "no QC picture")}
    assert len(errors) == len(expected), result.stderr
    for case_id, fragments in expected.items():
        [line] = [line for line in errors if f"case {case_id} " in line]
        assert all(fragment in line for fragment in fragments), line
    by_case = {r["case"]: r for r in csv.DictReader(open(tmp_path / "m.csv"))}
    assert set(by_case) == {good.name, truncated.name, shifted.name, foreign.name, regridded.name, "mean"}
    assert float(by_case[good.name]["dice_WT"]) == 1.0 and float(by_case[regridded.name]["dice_WT"]) == 1.0
    assert all(float(by_case[c]["dice_WT"]) == 0.0 for c in (truncated.name, shifted.name, foreign.name))
    assert [p.name for p in (tmp_path / "qc").iterdir()] == [f"{good.name}.png"]


def test_evaluate_holds_a_2023_named_truth_to_labels_0_to_3(tmp_path):
    """Under --labels auto a 2023-named truth with label 4 (BraTS 2024's resection cavity) is named and not
    scored, never read as ET; a 2018-named truth's 4 is its ET; --labels 2023 holds every file to 0-3."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    generate(gt / "new", 2, seed=54, size=(64, 64, 48))
    generate(gt / "old", 1, seed=55, layout=Layout.BRATS2018, size=(64, 64, 48))
    pred.mkdir()
    for seg in sorted(gt.rglob("*seg.nii.gz")):
        shutil.copy(seg, pred / f"{seg.parent.name}.nii.gz")
    cavity, kept = sorted((gt / "new").iterdir())
    [seg] = cavity.glob("*-seg.nii.gz")
    relabel_edema(seg, 4)
    result = python_cli("evaluate", "--pred", str(pred), "--gt", str(gt), "--csv", str(tmp_path / "m.csv"))
    assert result.returncode == 1, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: case {cavity.name} [{seg}]: labels [4]") and "resection cavity" in error
    assert error.endswith("(not scored)")
    by_case = {r["case"]: r for r in csv.DictReader(open(tmp_path / "m.csv"))}
    [old] = (gt / "old").iterdir()
    assert sorted(by_case) == sorted([kept.name, old.name, "mean"])
    assert float(by_case[old.name]["dice_ET"]) == 1.0 and float(by_case[kept.name]["dice_ET"]) == 1.0
    strict = python_cli("evaluate", "--pred", str(pred), "--gt", str(gt), "--labels", "2023")
    assert strict.returncode == 1 and f"case {old.name} " in strict.stderr and "labels [4]" in strict.stderr
    recoded = python_cli("evaluate", "--pred", str(pred), "--gt", str(gt / "new"), "--csv", str(tmp_path / "r.csv"),
                         "--truth-recode", "4:0")  # the cavity read as background: scored, the file unchanged
    assert recoded.returncode == 0, recoded.stderr
    by_case = {r["case"]: r for r in csv.DictReader(open(tmp_path / "r.csv"))}
    assert float(by_case[cavity.name]["dice_ET"]) == 1.0 and float(by_case[cavity.name]["dice_WT"]) < 1.0
    assert 4 in sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))


@pytest.mark.parametrize("layout", [Layout.BRATS2023, Layout.BRATS2018])
def test_evaluate_reads_a_folder_of_ground_truths_alone(tmp_path, layout):
    """Label maps without their images, flat or one folder per case (IDs as prediction gives them: the case
    folder's name, else the file's prefix), are scored; QC pictures, which need the images, are refused per
    case."""
    full = tmp_path / "full"
    generate(full, 3, seed=53, layout=layout, size=(64, 64, 48))
    flat, foldered, pred = tmp_path / "flat", tmp_path / "foldered", tmp_path / "pred"
    for folder in (flat, pred):
        folder.mkdir()
    for case in sorted(full.iterdir()):
        [seg] = [p for p in case.iterdir() if "seg" in p.name]
        shutil.copy(seg, flat / seg.name)
        (foldered / "release" / case.name).mkdir(parents=True)
        shutil.copy(seg, foldered / "release" / case.name / seg.name)
        shutil.copy(seg, pred / f"{case.name}.nii.gz")
    (pred / f"{case.name}.nii.gz").unlink()  # the last case's prediction is missing
    for gt in (flat, foldered):
        result = python_cli("evaluate", "--pred", str(pred), "--gt", str(gt), "--csv", str(tmp_path / "m.csv"))
        assert result.returncode == 0, result.stderr
        by_case = {r["case"]: r for r in csv.DictReader(open(tmp_path / "m.csv"))}
        assert sorted(by_case) == sorted([c.name for c in full.iterdir()] + ["mean"])
        assert [float(by_case[c.name]["dice_WT"]) for c in sorted(full.iterdir())] == [1.0, 1.0, 0.0]
        assert f"missing predictions (scored as empty): {case.name}" in result.stderr
    with_qc = python_cli("evaluate", "--pred", str(pred), "--gt", str(flat), "--qc", str(tmp_path / "qc"))
    assert with_qc.returncode == 1 and with_qc.stderr.count("not beside the ground truth (no QC picture)") == 2
    assert "| mean |" in with_qc.stdout


def test_the_confidence_check_counts_poor_cases_caught_and_others_flagged():
    def row(dice: float, confidence: float, warned: float) -> dict:
        return {"case": "x", "dice_WT": dice, "dice_TC": dice, "dice_ET": dice, "confidence": confidence,
                "warned": warned}

    unknown = float("nan")
    rows = [row(0.5, 0.4, 1), row(0.6, 0.8, 0), row(0.9, 0.6, 1), row(0.95, 0.9, 0), row(0.3, unknown, unknown)]
    check = check_confidence(rows, poor=0.7)
    assert (check.cases, check.without_confidence, check.poor, check.caught, check.flagged_others) == (4, 1, 2, 1, 1)
    assert check.pearson == pytest.approx(np.corrcoef([0.4, 0.8, 0.6, 0.9], [0.5, 0.6, 0.9, 0.95])[0, 1])
    assert "caught 1 of 2 poor case(s) (mean Dice under 0.7) and flagged 1 of 2 other(s)" in check.line()
    assert check_confidence(rows[:1]).pearson is None


def test_warnings_are_tallied_against_the_poor_cases_code_by_code():
    """Each warning code the scored cases carry gets a row (the enum's order, a code from a later version
    after them), then the cases without any warning; a case with no confidence or absent from the report is
    in none of them."""
    rows = [{"case": name, "dice_WT": dice, "dice_TC": dice, "dice_ET": dice}
            for name, dice in [("a", 0.2), ("b", 0.5), ("c", 0.9), ("d", 0.95), ("e", 0.1), ("f", 0.0)]]
    report = {"a": PredictedCase(0.4, ("low_confidence", "far_edema")), "b": PredictedCase(0.9, ("copied_modality",)),
              "c": PredictedCase(0.8, ("low_confidence", "new_in_a_later_version")), "d": PredictedCase(0.9, ()),
              "e": PredictedCase(0.7, ()), "f": PredictedCase(None, ())}
    tallies = tally_warnings(rows, report, poor=0.7)
    assert [(t.code, t.cases, t.poor) for t in tallies] == [
        ("copied_modality", 1, 1), ("low_confidence", 2, 1), ("far_edema", 1, 1), ("new_in_a_later_version", 1, 0),
        (None, 2, 1)]
    assert tallies[1].mean_dice == pytest.approx(0.55) and tallies[-1].mean_dice == pytest.approx(0.525)
    stream = io.StringIO()
    print_warning_tallies(tallies, 0.7, stream)
    assert "| low_confidence | 2 | 1 | 0.5500 |" in stream.getvalue()
    assert "| (none) | 2 | 1 | 0.5250 |" in stream.getvalue()
    [nothing] = tally_warnings(rows, {}, 0.7)
    assert (nothing.code, nothing.cases, nothing.poor) == (None, 0, 0) and np.isnan(nothing.mean_dice)


def test_a_predict_report_from_before_the_warning_codes_still_says_which_cases_were_flagged(tmp_path):
    """Reports written before ``warning_codes`` existed carry only the messages: the low-confidence warning
    is recognised by its message, and codes that are not strings make the file unusable."""
    old = {"cases": [{"case_id": "a", "confidence": 0.5, "warnings": ["low confidence: review this segmentation"]},
                     {"case_id": "b", "confidence": 0.9, "warnings": []}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    report = read_predict_report(tmp_path / "old.json")
    assert report["a"] == PredictedCase(0.5, ("low_confidence",)) and report["a"].warned
    assert report["b"] == PredictedCase(0.9, ()) and not report["b"].warned
    old["cases"][1]["warning_codes"] = [3]
    (tmp_path / "bad.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="is not a report that predict --report writes"):
        read_predict_report(tmp_path / "bad.json")
