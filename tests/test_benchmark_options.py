"""The benchmark's TILING tokens reach the predictor as the knobs they name."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from benchmark import predictor_options  # noqa: E402

from app.inference import EnsemblePredictor  # noqa: E402
from app.preprocess import CROP_MARGIN  # noqa: E402


@pytest.mark.parametrize("token, expected", [
    ("fast", {"tiling": "fast"}),
    ("paper", {"tiling": "paper"}),
    ("whole", {"tiling": "fast", "max_tile": (160, 192, 192), "margin": 8}),
    ("t24x48x64m3", {"tiling": "fast", "max_tile": (24, 48, 64), "margin": 3}),
    ("papershift2", {"tiling": "paper", "crop_margin": CROP_MARGIN + 2}),
    ("fastfixed", {"tiling": "fast", "shift_folds": False}),
    ("fast@1.25", {"tiling": "fast", "scales": (1.0, 1.25)}),
    ("paper@0.8@1.2", {"tiling": "paper", "scales": (1.0, 0.8, 1.2)}),
    ("t16x32x32m2fixed", {"tiling": "fast", "max_tile": (16, 32, 32), "margin": 2, "shift_folds": False}),
])
def test_tokens_become_predictor_knobs(token, expected):
    options = predictor_options(token)
    assert options == expected
    predictor = EnsemblePredictor(device="cpu", **options)  # every token builds the predictor it names
    assert predictor.tiling.value == options["tiling"]
    assert predictor.planner.shift_folds == options.get("shift_folds", True)
    assert predictor.crop_margin == options.get("crop_margin", CROP_MARGIN)
    assert predictor.scales == options.get("scales", (1.0,))
    if "max_tile" in options:
        assert (predictor.planner.max_tile, predictor.planner.margin) == (options["max_tile"], options["margin"])


@pytest.mark.parametrize("token", ["t16x32m2", "tiles", "papershift", "t16x32x32", "fixed", "paperfixed"])
def test_unknown_tokens_are_refused(token):
    with pytest.raises(ValueError, match="tiling must be"):
        predictor_options(token)


@pytest.mark.parametrize("token", ["fast@3", "fast@1", "fast@x"])
def test_bad_scales_in_tokens_are_refused(token):
    with pytest.raises(ValueError):
        predictor_options(token)



def test_sweep_cortex_factor_gives_more_cortex_than_any_training_draw():
    """The out-of-distribution sweep's cortex steps reach past the share the generator holds training draws to,
    each step more than the last."""
    from ood_sweep import ANATOMY

    from app.phantoms import DEFAULT_RANGES, grey_matter_share, make_phantom

    shares = [grey_matter_share(make_phantom(12, 0, (120, 120, 78), ranges=ANATOMY["cortex"](level)).tissue)
              for level in ("mild", "moderate", "strong")]
    assert shares == sorted(shares) and shares[-1] > DEFAULT_RANGES.grey_matter_share[1] + 0.05, shares


def test_agreement_rows_score_each_tiling_against_paper_and_truth(tmp_path):
    """benchmarks/agreement.py on one small phantom case, one shipped fold."""
    from agreement import case_rows, mean_rows

    from app.io import find_cases
    from app.phantoms import generate
    from app.weights import DEFAULT_WEIGHTS_DIR, load_ensemble

    generate(tmp_path, 1, seed=61, size=(96, 112, 64))
    [case] = find_cases(tmp_path).cases
    _, models = load_ensemble(DEFAULT_WEIGHTS_DIR, folds=[0])
    rows = case_rows(case, models, ["fast"], "cpu", "fp32")
    assert [r["tiling"] for r in rows] == ["paper", "fast"]
    paper, fast = rows
    assert all(paper[f"{kind} {r}"] == 1.0 for kind in ("vs paper", "raw vs paper") for r in ("WT", "TC", "ET"))
    assert all(0.0 <= fast[k] <= 1.0 for k in fast if "vs " in k)
    assert any(fast[f"raw vs paper {r}"] < 1.0 for r in ("WT", "TC", "ET"))  # tile borders move the raw mask
    assert fast["vs truth WT"] > 0.5, fast  # the shipped fold finds the phantom's tumour
    [mean_paper, mean_fast] = mean_rows(rows, ["fast"])
    assert mean_fast["case"] == "mean" and mean_fast["vs paper TC"] == fast["vs paper TC"]


def test_confidence_calibration_finds_the_threshold_that_separates_poor_cases(tmp_path):
    """benchmarks/calibrate_confidence.py: when confidence ranks the cases perfectly, the chosen threshold
    flags exactly the poor ones."""
    import numpy as np
    from calibrate_confidence import read_rows, threshold_rows

    path = tmp_path / "rows.csv"
    rows = [(0.9, 0.95), (0.85, 0.9), (0.8, 0.8), (0.6, 0.5), (0.5, 0.3), (0.4, 0.1)]  # (confidence, Dice)
    path.write_text("WT,TC,ET,confidence\n" + "".join(f"{d},{d},{d},{c}\n" for c, d in rows))
    confidence, dice = read_rows([path])
    np.testing.assert_allclose(dice, [d for _, d in rows])
    best = max(threshold_rows(confidence, dice, poor=0.7), key=lambda r: (r["youden"], -r["flagged"]))
    assert best["flagged"] == 3 and best["sensitivity"] == 1.0 and best["specificity"] == 1.0
    assert 0.6 < best["threshold"] <= 0.8
    evaluated = tmp_path / "evaluate.csv"  # evaluate --predict-report --csv: a case without one, the mean row
    evaluated.write_text("case,dice_WT,dice_TC,dice_ET,confidence,warned\n" + "".join(
        f"c{i},{d},{d},{d},{c},0\n" for i, (c, d) in enumerate(rows)) + "lost,0,0,0,nan,nan\nmean,1,1,1,1,0\n")
    assert [a.tolist() for a in read_rows([evaluated])] == [a.tolist() for a in (confidence, dice)]


def test_ensemble_analysis_scores_steps_folds_and_candidates_and_resumes(tmp_path):
    """benchmarks/ensemble_analysis.py as a user runs it: the shipped ensemble and one candidate folder on a
    small phantom case, then again (the case is skipped), then the summary alone."""
    import json
    import subprocess

    from app.phantoms import generate

    from .helpers import ROOT, random_weights

    generate(tmp_path / "cases", 1, seed=61, size=(96, 112, 64))
    candidate = random_weights(tmp_path / "random", width=4, folds=2)
    jsonl = tmp_path / "analysis.jsonl"
    command = [sys.executable, str(ROOT / "benchmarks" / "ensemble_analysis.py"), "--input", str(tmp_path / "cases"),
               "--jsonl", str(jsonl), "--candidate", f"random={candidate}", "--threads", "2"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    [row] = [json.loads(line) for line in jsonl.read_text().splitlines()]
    ensemble = row["ensemble"]
    assert ensemble["default post-processing"][0] > 0.5, ensemble  # the shipped ensemble finds the tumour
    assert {"without step 1", "without step 4", "random ensemble, no post-processing"} <= set(ensemble)
    assert len(row["single"]) == 12 and set(row["swap"]) == {"random:0", "random:1"}
    assert all(0.0 <= d <= 1.0 for v in row["single"].values() for d in v)
    assert "| fold | shipped | random |\n|---|---|---|\n| 0 | " in first.stdout  # a well-formed table
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len(jsonl.read_text().splitlines()) == 1 and again.stderr == ""
    alone = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ensemble_analysis.py"), "--summary", str(jsonl)],
                           capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0 and "1 case(s)" in alone.stdout


def test_fusion_grid_default_row_is_the_products_score_and_kept_crops_are_reused(tmp_path):
    """benchmarks/fusion_grid.py on a small phantom with the shipped ensemble: its default row equals the
    Dice of `predict`'s own label map; a second grid into a new file reads the kept crop and scores alike."""
    import json
    import subprocess

    import SimpleITK as sitk

    from app.conventions import from_file_labels
    from app.io import find_cases, load_case, load_segmentation
    from app.metrics import region_dice
    from app.phantoms import generate

    from .helpers import ROOT

    generate(tmp_path / "cases", 1, seed=62, size=(96, 112, 64))
    [case] = find_cases(tmp_path / "cases").cases
    predicted = subprocess.run([sys.executable, "-m", "app", "predict", "--input", str(tmp_path / "cases"),
                                "--output", str(tmp_path / "out"), "--quiet", "--threads", "2"],
                               capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert predicted.returncode == 0, predicted.stderr
    loaded = load_case(case)
    truth = from_file_labels(load_segmentation(case, loaded.reference))
    label_map = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{case.case_id}.nii.gz")))
    product = region_dice(from_file_labels(label_map), truth)

    def grid(jsonl):
        command = [sys.executable, str(ROOT / "benchmarks" / "fusion_grid.py"), "--input", str(tmp_path / "cases"),
                   "--jsonl", str(jsonl), "--probabilities", str(tmp_path / "crops"), "--threads", "2"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        [row] = [json.loads(line) for line in jsonl.read_text().splitlines()]
        return row["scores"], done.stdout

    first, table = grid(tmp_path / "first.jsonl")
    assert first["default (0.5 / 0.5 / 0.5)"] == pytest.approx([product[r] for r in ("WT", "TC", "ET")], abs=1e-4)
    assert first["default (0.5 / 0.5 / 0.5)"][0] > 0.5  # the shipped ensemble finds the tumour
    assert "| tumour 0.4 |" in table and first["tumour 0.4"] != first["tumour 0.6"]
    assert [p.name for p in (tmp_path / "crops").iterdir()] == [f"{case.case_id}.npz"]
    second, _ = grid(tmp_path / "second.jsonl")
    assert second == first


def test_agreement_draws_its_phantoms_from_the_ranges_asked_for(tmp_path):
    """agreement.py --ranges wide measures on phantoms outside the training ranges (IDs PHW), and a second
    run reuses the folder the first left."""
    from agreement import phantom_cases

    from app.io import find_cases
    from app.options import PhantomPreset

    wide = phantom_cases(tmp_path, 1, 61, PhantomPreset.WIDE, size=(48, 48, 32))
    training = phantom_cases(tmp_path, 1, 61, PhantomPreset.TRAINING, size=(48, 48, 32))
    assert wide != training
    assert [c.case_id for c in find_cases(wide).cases] == ["BraTS-PHW-06100-000"]
    assert [c.case_id for c in find_cases(training).cases] == ["BraTS-PHA-06100-000"]
    stamp = next(wide.rglob("*-t2f.nii.gz")).stat().st_mtime_ns
    assert phantom_cases(tmp_path, 1, 61, PhantomPreset.WIDE, size=(48, 48, 32)) == wide
    assert next(wide.rglob("*-t2f.nii.gz")).stat().st_mtime_ns == stamp


def test_sweep_from_csv_merges_earlier_runs_rows_into_one_table(tmp_path):
    """`ood_sweep.py --from-csv` runs nothing and prints the table over every row of the files given, so a
    sweep extended by `--skip-cases` reads as one."""
    import subprocess

    header = "factor,strength,case,WT,TC,ET,confidence,seconds\n"
    (tmp_path / "a.csv").write_text(header + "clean,-,1,0.9,0.6,0.3,0.8,1.0\nbias,mild,1,0.5,0.5,0.5,0.5,1.0\n")
    (tmp_path / "b.csv").write_text(header + "clean,-,5,0.7,0.4,0.1,0.6,1.0\n")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ood_sweep.py"
    done = subprocess.run([sys.executable, str(script), "--from-csv", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| clean | - | 0.800 | 0.500 | 0.200 | 0.500 | 0.700 |" in done.stdout
    assert "| bias | mild | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |" in done.stdout
    assert "over 3 case-conditions" in done.stdout
    refused = subprocess.run([sys.executable, str(script), "--cases", "4", "--skip-cases", "4"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--skip-cases must be" in refused.stderr


def test_gpu_session_dry_run_returns_every_fold_in_tarballs_under_the_size_limit(tmp_path):
    """The GPU session script, dry-run on the CPU, trains its folds and packs them so that every tarball stays
    under PACK_LIMIT (a session returns files of at most 16 MiB) and every fold comes back exactly once."""
    import os
    import subprocess
    import tarfile

    from .helpers import ROOT

    out, work = tmp_path / "out", tmp_path / "work"
    limit = 2_500_000  # over one width-8 fold (1.8 MB), under two: one fold per tarball
    env = {**os.environ, "DEVICE": "cpu", "N_TRAIN": "4", "SIZE": "64,64,48", "FOLDS": "3", "FOLD_SECONDS": "2",
           "STAGES": "1,1,100000", "VALIDATE": "1000", "VAL_CASES": "1", "WORKERS": "1", "BENCH_SECONDS": "1",
           "OUT": str(out), "WORK": str(work), "PACK_LIMIT": str(limit)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    tarballs = sorted(out.glob("weights_*.tar"))
    assert len(tarballs) == 3, done.stdout
    members = []
    for tarball in tarballs:
        assert tarball.stat().st_size < limit
        with tarfile.open(tarball) as archive:
            members += archive.getnames()
    folds = sorted(m for m in members if m.endswith(".safetensors"))
    assert folds == [f"fold_{k}.safetensors" for k in range(3)]
    assert "manifest.json" in members


def test_gpu_folds_dry_run_trains_each_arms_fold_and_starts_one_from_a_carried_folder(tmp_path):
    """benchmarks/gpu_folds.sh, dry-run on the CPU: two arms at once, one from a random start on fold 2, one
    from fold 1 of a weights folder; each comes back as its own tarball holding its fold, the log says which
    fold started where, odd folds take AUGMENT_ODD's level, every fold RARE_WEIGHT's draw, BRIGHT_CORTEX's
    phantoms and COMPILE's compiled steps."""
    import json
    import os
    import subprocess
    import tarfile

    from .helpers import ROOT, random_weights

    start = random_weights(tmp_path / "start", width=4, folds=2)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DEVICE": "cpu", "N_TRAIN": "10", "SIZE": "64,64,48", "TRAIN_SECONDS": "2",
           "WORKERS": "1", "AVERAGE_FROM": "1", "STAGES": "1,1,100000", "OUT": str(out), "WORK": str(work),
           "AUGMENT_ODD": "strong", "RARE_WEIGHT": "4", "COMPILE": "1", "BRIGHT_CORTEX": "30",
           "ARMS": f"a:8:16,32,32:1:2 b:4:16,32,32:1:1:{start}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_folds.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("arm exit status 0") == 2, done.stdout
    for arm, fold, augment in (("a", 2, "default"), ("b", 1, "strong")):
        with tarfile.open(out / f"weights_{arm}.tar") as archive:
            assert sorted(archive.getnames()) == sorted(["manifest.json", f"runs/fold_{fold}/result.json",
                                                         f"fold_{fold}.safetensors"])
            manifest = json.load(archive.extractfile("manifest.json"))
        [row] = manifest["folds"]
        assert row["augment"] == augment
        assert manifest["training"]["config"]["rare_case_weight"] == 4.0
        assert manifest["training"]["config"]["compile"] is True
        assert manifest["training"]["data"]["phantoms"]["bright_cortex_percent"] == 30
        assert ("initialised_from" in row) == (arm == "b")
    assert "training steps compiled" in done.stdout
    log = (out / "train_log.txt").read_text()
    assert f"fold 1: initialised from {start}/fold_1.safetensors" in log
    assert "fold 2: initialised" not in log


def test_agreement_measures_on_the_cases_with_ground_truth_of_a_folder(tmp_path):
    """agreement.py --data: the cases with ground truth in a folder (here signal-equation phantoms in the BraTS
    2021 layout; a case without ground truth is left out), the first --cases of them by ID, through the script."""
    import subprocess

    from agreement import folder_cases
    from signal_phantoms import make_case, write_case

    from .helpers import ROOT, random_weights

    data = tmp_path / "data"
    for index in range(3):
        folder = write_case(make_case(7, index, (96, 96, 64)), data)
    (folder / f"{folder.name}_seg.nii.gz").unlink()
    assert [c.case_id for c in folder_cases(data)] == ["BraTS2021_07000", "BraTS2021_07001"]
    assert [c.case_id for c in folder_cases(data, 1)] == ["BraTS2021_07000"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no cases with ground truth"):
        folder_cases(tmp_path / "empty")
    weights = random_weights(tmp_path / "weights", folds=1)
    script = [sys.executable, str(ROOT / "benchmarks" / "agreement.py")]
    done = subprocess.run([*script, "--data", str(data), "--cases", "1", "--tilings", "fast",
                           "--weights", str(weights)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ")[:2] for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [["| BraTS2021_07000", "paper"], ["| BraTS2021_07000", "fast"], ["| mean", "paper"],
                        ["| mean", "fast"]], done.stdout
    refused = subprocess.run([*script, "--data", str(tmp_path / "empty")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--data: no cases with ground truth" in refused.stderr
    missing = subprocess.run([*script, "--data", str(tmp_path / "absent")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_voxel_sizes_reads_another_generator_s_folder_and_runs_the_modes_asked_for(tmp_path, capsys):
    """voxel_sizes.py --data (BraTS 2021 files, `_seg` ground truth re-gridded as labels) --modes all: finer
    voxels shrunk to 1 mm by the product and the labels written back on the case's own grid."""
    import SimpleITK as sitk
    from signal_phantoms import make_case, write_case
    from voxel_sizes import main

    data = tmp_path / "data"
    for index in range(2):
        write_case(make_case(7, index, (96, 96, 64)), data)
    work = tmp_path / "work"
    assert main(["--work", str(work), "--data", str(data), "--cases", "1", "--folds", "0", "--spacings", "0.8,0.8,0.8",
                 "--modes", "all"]) == 0
    rows = [line.split(" | ")[:2] for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 x 1")
            or line.startswith("| 0.8")]
    assert rows == [["| 1 x 1 x 1", "(as generated)"], ["| 0.8 x 0.8 x 0.8", "`--resample all`"]]
    [case] = (work / "0.8_0.8_0.8").iterdir()
    truth = sitk.ReadImage(str(case / f"{case.name}_seg.nii.gz"))
    assert truth.GetSize() == (120, 120, 80) and truth.GetPixelID() == sitk.sitkUInt8
    assert set(sitk.GetArrayViewFromImage(truth).ravel()) <= {0, 1, 2, 4}
    [written] = (work / "pred-0.8_0.8_0.8-all").iterdir()
    assert sitk.ReadImage(str(written)).GetSize() == (120, 120, 80)
    assert (work / "pred-0.8_0.8_0.8-all.json").is_file() and (work / "pred-0.8_0.8_0.8-all.csv").is_file()
    with pytest.raises(SystemExit):
        main(["--work", str(tmp_path / "none"), "--data", str(tmp_path / "work" / "pred-0.8_0.8_0.8-all")])
    with pytest.raises(SystemExit):
        main(["--work", str(tmp_path / "w"), "--modes", "auto,nearest"])


def test_train_benchmark_refuses_a_patch_the_network_cannot_pool():
    """A patch side that is not a multiple of 8 fails at once with the reason, before any phantom is made."""
    import subprocess

    from .helpers import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_benchmark.py"), "--patch-size", "20,40,40"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--patch-size 20,40,40: every side must be a positive multiple of 8" in done.stderr


def test_voxel_sizes_regrids_the_phantoms_and_scores_both_modes_on_their_own_grids(tmp_path, capsys):
    """benchmarks/voxel_sizes.py on one small phantom, one shipped fold, one thick-slice grid."""
    import SimpleITK as sitk
    from voxel_sizes import main

    assert main(["--work", str(tmp_path), "--cases", "1", "--size", "96,112,64", "--folds", "0",
                 "--spacings", "1,1,2.5"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith("| 1 x 1")]
    assert [row.split(" | ")[1] for row in rows] == ["(as generated)", "`--resample auto`", "`--resample off`"]
    assert all(0.0 <= float(value) <= 1.0 for row in rows for value in row.split(" | ")[2:5])
    [case] = (tmp_path / "1_1_2.5").iterdir()
    image = sitk.ReadImage(str(next(case.glob("*-t2f.nii.gz"))))
    assert image.GetSize() == (96, 112, 26) and image.GetSpacing() == (1.0, 1.0, 2.5)
    [written] = (tmp_path / "pred-1_1_2.5-auto").iterdir()
    assert sitk.ReadImage(str(written)).GetSize() == (96, 112, 26)
