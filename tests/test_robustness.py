"""The bad-input and fault matrix, each row through the real CLI in a subprocess."""

import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from app.conventions import Layout
from app.io import read_nifti_space
from app.phantoms import generate
from app.qc import NOTE_COLOUR

from .helpers import ROOT, random_weights, run_cli, small_cases


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return random_weights(tmp_path_factory.mktemp("weights"), folds=1)


@pytest.fixture()
def cohort(tmp_path) -> Path:
    """Two good cases; each test breaks one more case beside them."""
    small_cases(tmp_path / "in", 2, seed=21)
    return tmp_path / "in"


def _bad_case(cohort: Path, name: str = "BAD") -> Path:
    [source] = small_cases(cohort.parent / "spare", 1, seed=22)
    target = cohort / name
    shutil.copytree(source, target)
    for path in target.iterdir():
        path.rename(target / path.name.replace(source.name, name))
    return target


def _predict(cohort: Path, weights: Path, *extra: str):
    out = cohort.parent / "out"
    return run_cli("--input", str(cohort), "--output", str(out), "--weights", str(weights), *extra), out


def _assert_fails_alone(result, out: Path, case_id: str, fragment: str, file_hint: str | None = None):
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, result.stderr
    assert case_id in failed[0] and fragment in failed[0], failed[0]
    if file_hint:
        assert file_hint in failed[0]
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and f"{case_id}.nii.gz" not in written, written


# ------------------------------------------------------------------------------- must fail alone


@pytest.mark.parametrize("renamed", [None, "BAD-t1gd.nii.gz"])
def test_missing_modality(cohort, weights, renamed):
    """Deleted, or under a name no layout reads (MSD's "t1gd"): the failure names the file it did not read."""
    bad = _bad_case(cohort)
    if renamed:
        (bad / "BAD-t1c.nii.gz").rename(bad / renamed)
    else:
        (bad / "BAD-t1c.nii.gz").unlink()
    result, out = _predict(cohort, weights)
    _assert_fails_alone(result, out, "BAD", "missing modality t1c", renamed)
    assert ("named as no BraTS layout" in result.stderr) == bool(renamed)


def test_mixed_conventions(cohort, weights):
    bad = _bad_case(cohort)
    (bad / "BAD-t2w.nii.gz").rename(bad / "BAD_t2.nii.gz")
    _assert_fails_alone(*_predict(cohort, weights), "BAD", "naming conventions mixed")


def test_duplicate_ids(cohort, weights):
    bad = _bad_case(cohort, "Dup")
    for path in bad.iterdir():  # the same case ID once more as flat files in the input folder
        shutil.copy(path, cohort / path.name)
    result, out = _predict(cohort, weights)
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and all("duplicate case ID" in line for line in failed)
    assert len(list(out.iterdir())) == 2


def _rewrite(path: Path, array: np.ndarray, spacing=None, origin=None):
    image = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(array)
    new.SetSpacing(spacing or image.GetSpacing())
    new.SetOrigin(origin or image.GetOrigin())
    if array.ndim == 3:
        new.SetDirection(image.GetDirection())
    sitk.WriteImage(new, str(path), True)


def test_size_disagreement(cohort, weights):
    bad = _bad_case(cohort)
    _rewrite(bad / "BAD-t2w.nii.gz", np.ones((40, 64, 64), np.int16))
    _assert_fails_alone(*_predict(cohort, weights), "BAD", "geometry differs", "BAD-t2w.nii.gz")


def test_spacing_disagreement_beyond_rounding(cohort, weights):
    bad = _bad_case(cohort)
    path = bad / "BAD-t1n.nii.gz"
    _rewrite(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), spacing=(1.0, 1.0, 1.2))
    _assert_fails_alone(*_predict(cohort, weights), "BAD", "spacing (1.0, 1.0, 1.2) vs (1.0, 1.0, 1.0)",
                        "BAD-t1n.nii.gz")


@pytest.mark.parametrize("prop", ["origin", "direction"])
def test_origin_or_direction_disagreement_names_the_property(cohort, weights, prop):
    bad = _bad_case(cohort)
    path = bad / "BAD-t2w.nii.gz"
    image = sitk.ReadImage(str(path))
    if prop == "origin":
        image.SetOrigin(tuple(o + 5.0 for o in image.GetOrigin()))
    else:
        image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), True)
    result, out = _predict(cohort, weights)
    _assert_fails_alone(result, out, "BAD", f"geometry differs from BAD-t2f.nii.gz: {prop} ", "BAD-t2w.nii.gz")
    # One property differs, so the message names that one only.
    assert "size" not in result.stderr and "spacing" not in result.stderr


def test_spacing_rounding_is_tolerated(cohort, weights):
    bad = _bad_case(cohort)
    path = bad / "BAD-t1n.nii.gz"
    _rewrite(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), spacing=(1.0, 1.0, 1.0 + 1e-7))
    result, out = _predict(cohort, weights)
    assert result.returncode == 0, result.stderr
    assert len(list(out.iterdir())) == 3


@pytest.mark.parametrize("shape, hint", [((64, 64), "got 2D with 1 component(s)"),
                                         ((4, 48, 64, 64), "split a file of several modalities")])
def test_2d_and_4d_images(cohort, weights, shape, hint):
    """A 4D file (the Medical Segmentation Decathlon stores a case's four modalities in one) is refused with
    what to do."""
    bad = _bad_case(cohort)
    image = sitk.GetImageFromArray(np.ones(shape, np.int16))
    sitk.WriteImage(image, str(bad / "BAD-t2f.nii.gz"), True)
    result, out = _predict(cohort, weights)
    _assert_fails_alone(result, out, "BAD", "expected a 3D scalar image", "BAD-t2f.nii.gz")
    assert hint in result.stderr


def test_a_4d_file_holding_one_volume_is_read_as_the_3d_image_it_is(cohort, weights):
    """FSL and other tools store a single volume as 4D with one time point (dim[4] = 1): ITK reads it as 3D,
    so the case is segmented; its label map (whose geometry and header come from the FLAIR, the file made 4D
    here) is 3D, on the case's grid, with the FLAIR's qform and sform."""
    bad = _bad_case(cohort)
    path = bad / "BAD-t2f.nii.gz"
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([image]), str(path), True)
    assert read_nifti_space(path) == read_nifti_space(bad / "BAD-t2w.nii.gz")
    with gzip.open(path) as stored:
        assert struct.unpack("<8h", stored.read(56)[40:56])[:5] == (4, *image.GetSize(), 1)
    result, out = _predict(cohort, weights)
    assert result.returncode == 0, result.stderr
    labels = sitk.ReadImage(str(out / "BAD.nii.gz"))
    assert labels.GetDimension() == 3 and labels.GetSize() == image.GetSize()
    assert labels.GetOrigin() == image.GetOrigin() and labels.GetDirection() == image.GetDirection()
    assert read_nifti_space(out / "BAD.nii.gz") == read_nifti_space(bad / "BAD-t2w.nii.gz")


def test_all_zero_modality(cohort, weights):
    bad = _bad_case(cohort)
    _rewrite(bad / "BAD-t1c.nii.gz", np.zeros((48, 64, 64), np.int16))
    _assert_fails_alone(*_predict(cohort, weights), "BAD", "all zero", "BAD-t1c.nii.gz")


def test_truncated_gzip(cohort, weights):
    bad = _bad_case(cohort)
    path = bad / "BAD-t2w.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    _assert_fails_alone(*_predict(cohort, weights), "BAD", "unreadable NIfTI", "BAD-t2w.nii.gz")


def test_corrupt_gzip(cohort, weights):
    bad = _bad_case(cohort)
    path = bad / "BAD-t2w.nii.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    _assert_fails_alone(*_predict(cohort, weights), "BAD", "unreadable NIfTI", "BAD-t2w.nii.gz")


def test_sheared_affine_names_the_reason_not_the_source_line(cohort, weights):
    """ITK refuses a sheared (non-orthonormal) affine with its reason two lines into the message, below the
    C++ file that threw: the failure line carries the reason."""
    import nibabel

    bad = _bad_case(cohort)
    path = bad / "BAD-t2f.nii.gz"
    image = nibabel.load(str(path))
    affine = image.affine.copy()
    affine[0, 1] = 0.3
    nibabel.save(nibabel.Nifti1Image(np.asarray(image.dataobj), affine), str(path))
    result, out = _predict(cohort, weights)
    _assert_fails_alone(result, out, "BAD", "unreadable NIfTI: ITK only supports orthonormal direction cosines",
                        "BAD-t2f.nii.gz")
    assert ".cxx" not in result.stderr


def test_case_id_escaping_the_output_folder(cohort, weights):
    [source] = small_cases(cohort.parent / "spare", 1, seed=22, layout=Layout.BRATS2018)
    for path in source.iterdir():  # flat files whose ID prefix is ".."
        shutil.copy(path, cohort / path.name.replace(source.name, ".."))
    result, out = _predict(cohort, weights)
    _assert_fails_alone(result, out, "..", "escape")
    assert not (cohort.parent / ".nii.gz").exists() and not (out.parent / "..nii.gz").exists()


# ------------------------------------------------------------------------------------ must work


def test_cases_inside_an_unpacked_release_folder(tmp_path, weights):
    """A BraTS release unpacked into the input keeps its case folders a level or two down; each label map
    lands directly in the output folder, named by its case."""
    cases = small_cases(tmp_path / "in" / "Release" / "SiteA", 1, seed=23) + small_cases(tmp_path / "in", 1)
    result, out = _predict(tmp_path / "in", weights)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c.name}.nii.gz" for c in cases)


def test_nifti_files_outside_every_case_are_named_before_the_cases_run(cohort, weights, tmp_path):
    """nnU-Net's channel-numbered files beside BraTS cases are not guessed at: a warning names them (with how
    to rename them) before the first case starts, the report lists them, and the cases still run. Alone, they
    are a usage error saying the same."""
    nnunet = cohort / "imagesTs"
    nnunet.mkdir()
    [source] = small_cases(tmp_path / "spare", 1, seed=22)
    for channel, name in enumerate(["t2f", "t1n", "t1c", "t2w"]):
        shutil.copy(source / f"{source.name}-{name}.nii.gz", nnunet / f"BraTS2021_00000_{channel:04d}.nii.gz")
    report = tmp_path / "report.json"
    result, out = _predict(cohort, weights, "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert len(list(out.iterdir())) == 2
    lines = result.stderr.splitlines()
    [warning] = [i for i, line in enumerate(lines) if line.startswith("warning: 4 NIfTI file(s) outside every case")]
    assert warning < min(i for i, line in enumerate(lines) if line.endswith(": started"))
    assert "imagesTs/BraTS2021_00000_0000.nii.gz" in lines[warning] and "nnU-Net's channels" in lines[warning]
    unread = json.loads(report.read_text())["unread_files"]
    assert sorted(unread) == sorted(str(p) for p in nnunet.iterdir())
    for _ in range(2):  # our own label maps, in an output folder inside the input, are never listed
        again = run_cli("--input", str(cohort), "--output", str(cohort / "labels"), "--weights", str(weights))
        assert again.returncode == 0 and "warning: 4 NIfTI file(s)" in again.stderr, again.stderr
    alone, _ = _predict(nnunet, weights)
    assert alone.returncode == 2
    assert "no BraTS case found" in alone.stderr and "nnU-Net's channels" in alone.stderr


def test_unknown_extra_file_is_ignored(cohort, weights):
    (cohort / next(iter(os.listdir(cohort))) / "notes.nii.gz").write_bytes(b"not a nifti at all")
    (cohort / "README.txt").write_text("hello")
    result, out = _predict(cohort, weights)
    assert result.returncode == 0, result.stderr
    assert len(list(out.iterdir())) == 2


@pytest.mark.parametrize("resample", ["auto", "off", "all"])
def test_odd_size_and_anisotropic_spacing(tmp_path, weights, resample):
    [case] = small_cases(tmp_path / "in", 1, size=(57, 61, 29))
    for path in case.iterdir():
        image = sitk.ReadImage(str(path))
        image.SetSpacing((0.9, 1.1, 2.5))
        sitk.WriteImage(image, str(path), True)
    result, out = _predict(tmp_path / "in", weights, "--resample", resample)
    assert result.returncode == 0, result.stderr
    [written] = list(out.iterdir())
    image = sitk.ReadImage(str(written))
    assert image.GetSize() == (57, 61, 29) and np.allclose(image.GetSpacing(), (0.9, 1.1, 2.5))
    grid = {"auto": "0.90x1.00x1.01", "all": "1.01x1.00x1.01"}.get(resample)
    notes = [line for line in result.stderr.splitlines() if "voxels of 0.90x1.10x2.50 mm" in line]
    assert len(notes) == (grid is not None), result.stderr
    assert grid is None or f"segmented on a grid of {grid} mm" in notes[0], result.stderr


def test_a_case_stored_in_another_axis_order_gets_the_same_labels_on_its_own_grid(tmp_path, weights):
    """The same voxels stored with the axes permuted and flipped (sagittal slices first): segmented as BraTS
    stores a brain, so its labels are the BraTS-stored copy's, turned, on exactly its own geometry."""
    [case] = small_cases(tmp_path / "in", 1, seed=23)
    turned = tmp_path / "in" / "TURNED"
    turned.mkdir()
    for path in case.iterdir():
        image = sitk.PermuteAxes(sitk.Flip(sitk.ReadImage(str(path)), [True, False, False]), [2, 0, 1])
        sitk.WriteImage(image, str(turned / path.name.replace(case.name, "TURNED")), True)
    result, out = _predict(tmp_path / "in", weights)
    assert result.returncode == 0, result.stderr
    [note] = [line for line in result.stderr.splitlines() if "stored in another orientation" in line]
    assert note.startswith("TURNED")
    written = sitk.ReadImage(str(out / "TURNED.nii.gz"))
    source = sitk.ReadImage(str(next(turned.glob("*-t2f.nii.gz"))))
    assert written.GetSize() == source.GetSize() and written.GetDirection() == source.GetDirection()
    assert written.GetOrigin() == source.GetOrigin() and written.GetSpacing() == source.GetSpacing()
    back = sitk.Flip(sitk.PermuteAxes(written, [1, 2, 0]), [True, False, False])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case.name}.nii.gz")))
    assert labels.any() and np.array_equal(sitk.GetArrayFromImage(back), labels)


def test_a_case_whose_qform_and_sform_disagree_gets_a_label_map_where_its_images_lie(tmp_path, weights):
    """nibabel places such an image by its sform, ITK here by its qform, 10 mm apart: the label map carries
    the FLAIR's header fields as they are, so it lies on the images for either reader."""
    import nibabel

    [case] = small_cases(tmp_path / "in", 1, seed=23)
    for path in case.iterdir():
        image = nibabel.load(str(path))
        qform = image.affine.copy()
        qform[:3, 3] += 10
        moved = nibabel.Nifti1Image(np.asarray(image.dataobj), None, image.header)
        moved.set_sform(image.affine, code=2)
        moved.set_qform(qform, code=1)
        nibabel.save(moved, str(path))
    result, out = _predict(tmp_path / "in", weights)
    assert result.returncode == 0, result.stderr
    flair, written = next(case.glob("*-t2f.nii.gz")), out / f"{case.name}.nii.gz"
    assert np.allclose(nibabel.load(str(written)).affine, nibabel.load(str(flair)).affine)
    ours, theirs = sitk.ReadImage(str(written)), sitk.ReadImage(str(flair))
    assert ours.GetOrigin() == theirs.GetOrigin() and ours.GetDirection() == theirs.GetDirection()
    assert ours.GetSpacing() == theirs.GetSpacing() and ours.GetSize() == theirs.GetSize()
    skipped = run_cli("--input", str(tmp_path / "in"), "--output", str(out), "--weights", str(weights),
                      "--skip-existing")
    assert skipped.returncode == 0 and "skipped (already in output)" in skipped.stderr  # its grid matches


def test_nan_and_inf_voxels_warn_and_work(cohort, weights):
    case = sorted(cohort.iterdir())[0]
    path = next(case.glob("*-t2f.nii.gz"))
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    array[20, 30, 30], array[21, 30, 30] = np.nan, np.inf
    _rewrite(path, array)
    result, out = _predict(cohort, weights)
    assert result.returncode == 0, result.stderr
    assert "2 NaN/Inf voxels treated as background" in result.stderr
    assert len(list(out.iterdir())) == 2


def test_a_noise_floor_and_an_unstripped_border_warn_and_work(cohort, weights, tmp_path):
    """A noise floor around one modality's brain (small values: 1-20 where its tissue reads hundreds) is read
    as background, so the report's brain is the skull-stripped one, with a warning naming it; a border of
    tissue-like values (as an unstripped head has) is segmented as it is, with the unstripped warning."""
    floored, head = sorted(cohort.iterdir())
    brain_ml = {}
    for case, fill in ((floored, lambda rng, n, _: rng.uniform(1, 20, n)),
                       (head, lambda rng, n, tissue: rng.uniform(*np.percentile(tissue, [5, 95]), n))):
        path = next(case.glob("*-t1n.nii.gz"))
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        background = array == 0
        brain_ml[case.name] = np.count_nonzero(~background) * np.prod(image.GetSpacing()) / 1000
        array[background] = fill(np.random.default_rng(0), int(background.sum()), array[~background])
        _rewrite(path, array)
    report = tmp_path / "report.json"
    result, out = _predict(cohort, weights, "--report", str(report))
    assert result.returncode == 0, result.stderr
    [warned] = [line for line in result.stderr.splitlines() if "noise floor" in line]
    assert warned.startswith(f"{floored.name}: ok") and "a noise floor around the brain (" in warned
    [warned] = [line for line in result.stderr.splitlines() if "is the case skull-stripped?" in line]
    assert warned.startswith(f"{head.name}: ok") and "100% of the volume's border is nonzero" in warned
    cases = {c["case_id"]: c for c in json.loads(report.read_text())["cases"]}
    assert cases[floored.name]["warning_codes"][0] == "noise_floor"
    assert cases[floored.name]["image_checks"]["brain_ml"] == pytest.approx(brain_ml[floored.name], rel=0.01)
    assert cases[head.name]["image_checks"]["brain_ml"] > 1.5 * brain_ml[head.name]
    assert len(list(out.iterdir())) == 2


def test_a_modality_filled_with_a_copy_of_another_warns_and_works(cohort, weights, tmp_path):
    """T1 copied into T1c's place (a missing T1c filled in) is segmented with a warning naming the two, in the
    case's line and the report (its code in ``warning_codes``, in the messages' order, and the correlation in
    ``image_checks``); the case beside it gets none."""
    copied, clean = sorted(cohort.iterdir())
    shutil.copy(next(copied.glob("*-t1n.nii.gz")), next(copied.glob("*-t1c.nii.gz")))
    report = tmp_path / "report.json"
    result, out = _predict(cohort, weights, "--report", str(report), "--qc", str(tmp_path / "qc"))
    assert result.returncode == 0, result.stderr
    [warned] = [line for line in result.stderr.splitlines() if "hold the same image" in line]
    assert warned.startswith(f"{copied.name}: ok") and "t1 and t1c hold the same image (correlation 1.0000" in warned
    assert len(list(out.iterdir())) == 2
    cases = {c["case_id"]: c for c in json.loads(report.read_text())["cases"]}
    assert json.loads(report.read_text())["warning_counts"]["copied_modality"] == 1
    assert "cases with warnings: " in result.stderr and "copied_modality 1" in result.stderr.splitlines()[-1]
    record = cases[copied.name]
    assert len(record["warning_codes"]) == len(record["warnings"])
    [(message, code)] = [(m, c) for m, c in zip(record["warnings"], record["warning_codes"]) if "same image" in m]
    assert message.startswith("t1 and t1c hold the same image") and code == "copied_modality"
    assert "copied_modality" not in cases[clean.name]["warning_codes"]
    # What the checks measured is kept beside the warnings: the copy at r = 1, the clean case's pairs below it.
    assert record["image_checks"]["correlations"]["t1/t1c"] == pytest.approx(1.0)
    assert max(cases[clean.name]["image_checks"]["correlations"].values()) < 0.999
    # The QC picture carries the confidence and the warnings above its views, in NOTE_COLOUR (antialiased: its
    # hue at any brightness, which no grey image and no label overlay has): the copy warning's lines reach
    # below the confidence's.
    picture = np.asarray(Image.open(tmp_path / "qc" / f"{copied.name}.png").convert("RGB")).astype(int)
    red, green, blue = picture[..., 0], picture[..., 1], picture[..., 2]
    note = (blue == 0) & (red > 80) & (abs(green * NOTE_COLOUR[0] - red * NOTE_COLOUR[1]) <= 3 * NOTE_COLOUR[0])
    rows = np.flatnonzero(note.any(-1))
    assert rows.size and rows.min() >= 36 and rows.max() > 36 + 2 * 14


def test_spaces_non_ascii_and_symlinked_case_folders(tmp_path, weights):
    [a, b] = small_cases(tmp_path / "store", 2, seed=23, layout=Layout.TOOLKIT)
    cohort = tmp_path / "in"
    cohort.mkdir()
    shutil.copytree(a, cohort / "Fall mit Lücke ü")
    (cohort / "linked case").symlink_to(b, target_is_directory=True)
    result, out = _predict(cohort, weights)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["Fall mit Lücke ü.nii.gz", "linked case.nii.gz"]


def _as_nobody() -> list[str] | None:
    """Command prefix to drop root (permissions do not bind root), or None where that is impossible:
    no setpriv, or an interpreter or repository the unprivileged user cannot read (e.g. under /root).
    The Docker test runs the image as uid 1000 with a read-only /input regardless."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import numpy, torch, SimpleITK, app.cli"], cwd="/",
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return prefix if probe.returncode == 0 else None


NOBODY_SKIP = "cannot run the CLI as an unprivileged user here (no setpriv, or interpreter or repository unreadable)"


@pytest.fixture
def open_space(weights):
    """A folder under /tmp that the unprivileged user can reach (pytest's own tmp folders are root-only)
    holding a copy of the weights; removed afterwards."""
    space = Path(tempfile.mkdtemp(prefix="omnet-nobody-"))
    space.chmod(0o755)
    shutil.copytree(weights, space / "weights")
    for path in [space / "weights", *(space / "weights").iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield space
    for path in [space, *space.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(space)


def _run_as(prefix: list[str], cohort: Path, out: Path, weights: Path) -> subprocess.CompletedProcess:
    # run.sh runs $PYTHON: the interpreter the guard probed, not whatever python3 PATH finds for that user
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/nonexistent", "PYTHON": sys.executable}
    return subprocess.run([*prefix, str(ROOT / "run.sh"), "--input", str(cohort), "--output", str(out),
                           "--weights", str(weights)], capture_output=True, text=True, env=env, timeout=300)


def test_read_only_input_folder(open_space):
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip(NOBODY_SKIP)
    cohort = open_space / "in"
    small_cases(cohort, 1, seed=24)
    out = open_space / "out"
    out.mkdir()
    for path in [cohort, *cohort.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    out.chmod(0o777)
    result = _run_as(prefix, cohort, out, open_space / "weights")
    assert result.returncode == 0, result.stderr
    assert len(list(out.iterdir())) == 1


# --------------------------------------------------------------------------------- must stop with 2


def test_output_folder_not_writable(open_space):
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip(NOBODY_SKIP)
    small_cases(open_space / "in", 1, seed=24)
    out = open_space / "out"
    out.mkdir()
    for path in [open_space / "in", *(open_space / "in").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out.chmod(0o555)
    result = _run_as(prefix, open_space / "in", out, open_space / "weights")
    assert result.returncode == 2 and "not writable" in result.stderr, result.stderr


def test_output_path_is_a_file(cohort, weights):
    target = cohort.parent / "out"
    target.write_text("I am a file")
    result = run_cli("--input", str(cohort), "--output", str(target), "--weights", str(weights))
    assert result.returncode == 2 and f"output folder {target} is a file, not a folder" in result.stderr


def test_tampered_weights_refused_before_reading_cases(cohort, tmp_path):
    folder = random_weights(tmp_path / "w", folds=2)
    data = bytearray((folder / "fold_1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "fold_1.safetensors").write_bytes(bytes(data))
    result, out = _predict(cohort, folder)
    assert result.returncode == 2 and "differs from the manifest" in result.stderr
    assert not out.exists() or not list(out.iterdir())


def test_manifest_naming_a_missing_fold_is_refused(cohort, tmp_path):
    folder = random_weights(tmp_path / "w", folds=2)
    (folder / "fold_1.safetensors").unlink()
    result, _ = _predict(cohort, folder)
    assert result.returncode == 2 and "missing" in result.stderr


@pytest.mark.parametrize(("manifest", "message"), [
    ("{not json", "malformed"),
    ('{"width": 8, "folds": []}', "no 'variant' entry"),
    ('{"variant": "omnet_cga", "width": 8, "folds": []}', "lists no folds"),
])
def test_broken_manifest_is_one_line_before_any_case(cohort, tmp_path, manifest, message):
    folder = random_weights(tmp_path / "w", folds=1)
    (folder / "manifest.json").write_text(manifest)
    result, out = _predict(cohort, folder)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_pickle_weights_are_never_loaded(cohort, tmp_path):
    folder = random_weights(tmp_path / "w", folds=1)
    manifest = json.loads((folder / "manifest.json").read_text())
    # A pickle in place of the safetensors file (sha256 updated so only the format can stop it).
    evil = folder / "fold_0.safetensors"
    import pickle

    evil.write_bytes(pickle.dumps({"x": 1}))
    manifest["folds"][0]["sha256"] = hashlib.sha256(evil.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result, _ = _predict(cohort, folder)
    assert result.returncode == 2 and "cannot load fold 0" in result.stderr


# ------------------------------------------------------------------------ never a partial file


def test_failed_write_leaves_no_partial_file(cohort, weights, tmp_path):
    # Simulate a full disk: the staged file cannot be copied into the output folder.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import shutil\n"
        "_orig = shutil.copyfileobj\n"
        "def _full(src, dst, length=0):\n"
        "    dst.write(src.read(100))\n"
        "    raise OSError(28, 'No space left on device')\n"
        "shutil.copyfileobj = _full\n"
        "import os\n"
        "_replace = os.replace\n"
        "def _cross_device(a, b):\n"
        "    if 'omnet-write-' in str(a):\n"
        "        raise OSError(18, 'Invalid cross-device link')\n"
        "    return _replace(a, b)\n"
        "os.replace = _cross_device\n"
    )
    out = tmp_path / "out"
    result = run_cli("--input", str(cohort), "--output", str(out), "--weights", str(weights),
                     env={"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"})
    assert result.returncode == 1
    assert "No space left on device" in result.stderr
    assert list(out.iterdir()) == []


def _start(cohort: Path, out: Path, weights: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([str(ROOT / "run.sh"), "--input", str(cohort), "--output", str(out), "--weights",
                             str(weights), "--quiet"], env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_then_skip_existing_finishes_cleanly(tmp_path, weights, sig):
    # One small case first, then three cases 16x its size: when the first label map appears, the next cases
    # are still seconds from done, so the signal always lands mid-run (no race with a fast machine).
    small_cases(tmp_path / "in", 1, seed=25)
    generate(tmp_path / "in", 3, 25, Layout.BRATS2023, (128, 128, 96), start=1)
    out = tmp_path / "out"
    process = _start(tmp_path / "in", out, weights)
    # Kill once the first case is written, while the next ones are in flight.
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and any(p.suffix == ".gz" for p in out.iterdir())):
        time.sleep(0.05)
    process.send_signal(sig)
    process.wait(timeout=60)
    assert process.returncode != 0
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    assert finished and len(finished) < 4
    for name in finished:  # whatever is there is complete
        sitk.ReadImage(str(out / name))
    rerun = run_cli("--input", str(tmp_path / "in"), "--output", str(out), "--weights", str(weights),
                    "--skip-existing")
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("skipped (already in output)") == len(finished)
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert len(after) == 4 and all(after[n] == t for n, t in finished.items())


def test_skip_existing_redoes_a_map_on_another_grid(cohort, weights):
    """A label map left by another cohort under the same case ID (another grid) is not this case's: redone.
    A complete map on the case's grid is kept."""
    result, out = _predict(cohort, weights)
    assert result.returncode == 0, result.stderr
    stale, kept = sorted(out.iterdir())
    sitk.WriteImage(sitk.Image(30, 30, 20, sitk.sitkUInt8), str(stale), True)
    before = kept.stat().st_mtime_ns
    rerun, _ = _predict(cohort, weights, "--skip-existing")
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("skipped (already in output)") == 1 and f"{stale.name[:-7]}: ok" in rerun.stderr
    assert kept.stat().st_mtime_ns == before
    assert sitk.ReadImage(str(stale)).GetSize() == sitk.ReadImage(str(kept)).GetSize()


def test_same_input_twice_gives_identical_bytes(cohort, weights, tmp_path):
    digests = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        result = run_cli("--input", str(cohort), "--output", str(out), "--weights", str(weights))
        assert result.returncode == 0, result.stderr
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()})
    assert digests[0] == digests[1]
