import fcntl
import gzip
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app.case_warnings import WarningCode
from app.conventions import (
    LabelConvention,
    Layout,
    Modality,
    TruthRecoding,
    from_file_labels,
    ground_truth_convention,
    to_file_labels,
)
from app.io import (
    CaseError,
    check_nifti_integrity,
    find_cases,
    find_segmentations,
    geometry_difference,
    label_image,
    load_case,
    output_path,
    read_image,
    read_nifti_space,
    remove_partial_files,
    segmentation_layout,
    unread_files_note,
    write_image_atomic,
)
from app.phantoms import generate
from app.plausibility import hot_voxel_ceiling, stored_background


def _write(path: Path, array=None, spacing=(1.0, 1.0, 1.0)):
    array = np.ones((6, 7, 8), np.int16) if array is None else array
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), path.name.endswith(".gz"))
    return path


LAYOUT_FILES = {
    "2023": ["{id}-t1n.nii.gz", "{id}-t1c.nii.gz", "{id}-t2w.nii.gz", "{id}-t2f.nii.gz"],
    "2018": ["{id}_t1.nii.gz", "{id}_t1ce.nii.gz", "{id}_t2.nii.gz", "{id}_flair.nii.gz"],
    "fets": ["{id}_brain_t1.nii.gz", "{id}_brain_t1ce.nii.gz", "{id}_brain_t2.nii.gz", "{id}_brain_flair.nii.gz"],
    "toolkit": ["t1.nii.gz", "t1c.nii.gz", "t2.nii.gz", "fla.nii.gz"],
    "toolkit_ce": ["t1.nii", "t1ce.nii", "t2.nii", "flair.nii"],
}
EXPECTED_LAYOUT = {"2023": Layout.BRATS2023, "2018": Layout.BRATS2018, "fets": Layout.BRATS2018,
                   "toolkit": Layout.TOOLKIT, "toolkit_ce": Layout.TOOLKIT}


@pytest.mark.parametrize("style", list(LAYOUT_FILES))
def test_every_layout_is_found_in_channel_order(tmp_path, style):
    for name in LAYOUT_FILES[style]:
        _write(tmp_path / "CASE_A" / name.format(id="CASE_A"))
    found = find_cases(tmp_path)
    assert not found.errors
    [case] = found.cases
    assert case.case_id == "CASE_A" and case.layout is EXPECTED_LAYOUT[style]
    assert list(case.modalities) == [Modality.FLAIR, Modality.T1, Modality.T1C, Modality.T2]
    assert case.modalities[Modality.FLAIR].name.lower().startswith(("case_a", "fla", "flair"))


def test_flat_files_in_the_input_folder_form_cases(tmp_path):
    for case_id in ("BraTS2021_00001", "BraTS2021_00002"):
        for name in LAYOUT_FILES["2018"]:
            _write(tmp_path / name.format(id=case_id))
    found = find_cases(tmp_path)
    assert sorted(c.case_id for c in found.cases) == ["BraTS2021_00001", "BraTS2021_00002"]


def _case_folder(folder: Path, style: str = "2023") -> Path:
    for name in LAYOUT_FILES[style]:
        _write(folder / name.format(id=folder.name))
    return folder


def test_case_folders_are_found_up_to_three_levels_down(tmp_path):
    _case_folder(tmp_path / "TOP")
    _case_folder(tmp_path / "Release" / "ONE_DOWN", "2018")
    _case_folder(tmp_path / "Release" / "SiteA" / "TWO_DOWN")
    _case_folder(tmp_path / "Release" / "SiteA" / "2024" / "TOO_DEEP")
    (tmp_path / "Release" / "loop").symlink_to(tmp_path / "Release")  # searched once, not forever
    found = find_cases(tmp_path)
    assert not found.errors
    assert sorted(c.case_id for c in found.cases) == ["ONE_DOWN", "TOP", "TWO_DOWN"]


def test_a_subfolder_of_several_cases_flat_files_gives_each_case(tmp_path):
    for case_id in ("BraTS2021_00001", "BraTS2021_00002"):
        for name in LAYOUT_FILES["2018"] + ["{id}_seg.nii.gz"]:
            _write(tmp_path / "Validation" / name.format(id=case_id))
    _write(tmp_path / "Validation" / "BraTS2021_00003_t1.nii.gz")  # a case short of three modalities
    found = find_cases(tmp_path)
    assert sorted(c.case_id for c in found.cases) == ["BraTS2021_00001", "BraTS2021_00002"]
    assert all(c.segmentation.name == f"{c.case_id}_seg.nii.gz" for c in found.cases)
    [error] = found.errors
    assert error.case_id == "BraTS2021_00003" and "missing modality" in str(error)


def test_macos_metadata_is_never_read_as_an_image(tmp_path):
    case = _case_folder(tmp_path / "Release" / "X")
    (case / "._X-t1n.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble beside the image it describes
    (tmp_path / "__MACOSX" / "Release" / "X").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "Release" / "X" / "._X-t2f.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    found = find_cases(tmp_path)
    assert not found.errors and [c.case_id for c in found.cases] == ["X"]
    assert found.cases[0].modalities[Modality.T1].name == "X-t1n.nii.gz"


def test_a_missing_modality_names_the_files_beside_it_that_no_layout_reads(tmp_path):
    """MSD's "t1gd" for T1c: the case fails naming the file, in a case folder and among flat files; a case
    folder's other extras (a brain mask) are neither read nor listed."""
    for name in ["{id}_t1.nii.gz", "{id}_t1gd.nii.gz", "{id}_t2.nii.gz", "{id}_flair.nii.gz"]:
        _write(tmp_path / "in" / "MSD_1" / name.format(id="MSD_1"))
        _write(tmp_path / "flat" / name.format(id="MSD_2"))
    _case_folder(tmp_path / "flat" / "sub", "2018")
    _write(tmp_path / "flat" / "sub" / "sub_mask.nii.gz")
    for folder, case_id in [("in", "MSD_1"), ("flat", "MSD_2")]:
        found = find_cases(tmp_path / folder)
        [error] = found.errors
        assert error.case_id == case_id
        beside = f"beside them, named as no BraTS layout: {case_id}_t1gd.nii.gz"
        assert str(error).endswith(f"missing modality t1c ({beside})")
    assert [c.case_id for c in found.cases] == ["sub"]
    assert found.unread == [tmp_path / "flat" / "MSD_2_t1gd.nii.gz"]


def test_nifti_files_outside_every_case_are_listed_unread_with_a_hint_for_nnunet_names(tmp_path):
    _case_folder(tmp_path / "GOOD")
    channels = [_write(tmp_path / "imagesTs" / f"BraTS2021_00000_{c:04d}.nii.gz") for c in range(4)]
    loose = _write(tmp_path / "T1_post.nii")
    _write(tmp_path / "__MACOSX" / "stray.nii.gz")  # an archive's metadata folder is not searched
    found = find_cases(tmp_path)
    assert [c.case_id for c in found.cases] == ["GOOD"] and not found.errors
    assert sorted(found.unread) == sorted([*channels, loose])
    note = unread_files_note(found.unread, tmp_path)
    assert note.startswith("5 NIfTI file(s) outside every case were not read, named as no BraTS layout: ")
    assert "imagesTs/BraTS2021_00000_0000.nii.gz" in note and "and 2 more" in note
    assert "nnU-Net's channels" in note and "<ID>_flair" in note
    assert "nnU-Net" not in unread_files_note([loose], tmp_path)


def test_an_unreadable_folder_fails_alone(tmp_path, monkeypatch):
    _case_folder(tmp_path / "GOOD")
    (tmp_path / "LOCKED").mkdir()
    listing = Path.iterdir

    def iterdir(self):
        if self.name == "LOCKED":  # what a folder without read permission gives a non-root user
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    found = find_cases(tmp_path)
    assert [c.case_id for c in found.cases] == ["GOOD"]
    [error] = found.errors
    assert error.case_id == "LOCKED" and "cannot read the folder: Permission denied" in str(error)


def test_ground_truth_is_recognised_and_extras_ignored(tmp_path):
    for name in LAYOUT_FILES["2023"] + ["{id}-seg.nii.gz", "notes.nii.gz"]:
        _write(tmp_path / "X" / name.format(id="X"))
    (tmp_path / "X" / "readme.txt").write_text("hello")
    [case] = find_cases(tmp_path).cases
    assert case.segmentation is not None and case.segmentation.name == "X-seg.nii.gz"


def test_ground_truths_are_found_with_or_without_their_images(tmp_path):
    """IDs as `find_cases` gives them: a case folder's name, else the prefix; a toolkit "seg.nii.gz" only in
    its case folder; two files for one ID and unusable IDs refused by name."""
    for name in LAYOUT_FILES["toolkit"] + ["seg.nii.gz"]:
        _write(tmp_path / "T" / name)
    _write(tmp_path / "renamed" / "A-seg.nii.gz")  # a case folder named otherwise than its files
    for case_id in ("B", "C"):  # several cases' flat files in one subfolder, with and without images
        _write(tmp_path / "flat" / f"{case_id}_seg.nii.gz")
    _write(tmp_path / "flat" / "B_flair.nii.gz")
    _write(tmp_path / "D-seg.nii.gz")
    _write(tmp_path / "twice" / "D" / "D-seg.nii.gz")
    _write(tmp_path / "seg.nii.gz")  # no case folder: no ID
    _write(tmp_path / "..-seg.nii.gz")
    _write(tmp_path / ".hidden" / "E" / "E-seg.nii.gz")
    found, errors = find_segmentations(tmp_path)
    assert {case_id: path.relative_to(tmp_path).as_posix() for case_id, path in found.items()} == {
        "T": "T/seg.nii.gz", "renamed": "renamed/A-seg.nii.gz", "B": "flat/B_seg.nii.gz", "C": "flat/C_seg.nii.gz"}
    assert sorted((e.case_id, e.reason.split(" (")[0]) for e in errors) == [
        ("..", "case ID '..' would escape or hide in the output folder"), ("D", "two ground truths")]


def test_missing_modality_and_mixed_conventions_fail_alone(tmp_path):
    for name in LAYOUT_FILES["2023"][:3]:
        _write(tmp_path / "missing" / name.format(id="missing"))
    for name in LAYOUT_FILES["2023"][:2] + LAYOUT_FILES["2018"][2:]:
        _write(tmp_path / "mixed" / name.format(id="mixed"))
    for name in LAYOUT_FILES["2023"]:
        _write(tmp_path / "good" / name.format(id="good"))
    found = find_cases(tmp_path)
    assert [c.case_id for c in found.cases] == ["good"]
    messages = {e.case_id: str(e) for e in found.errors}
    assert "missing modality flair" in messages["missing"]
    assert "naming conventions mixed" in messages["mixed"]


def test_duplicate_ids_fail_both(tmp_path):
    for name in LAYOUT_FILES["2018"]:
        _write(tmp_path / "dup" / name.format(id="dup"))
        _write(tmp_path / name.format(id="dup"))
    found = find_cases(tmp_path)
    assert not found.cases and len(found.errors) == 2
    assert all("duplicate case ID" in str(e) for e in found.errors)


def test_case_ids_that_escape_are_refused(tmp_path):
    for bad in ("..", ".hidden", "a/b", "a\\b"):
        with pytest.raises(CaseError):
            output_path(tmp_path, bad)
    assert output_path(tmp_path, "ok case ü") == tmp_path / "ok case ü.nii.gz"


def test_truncated_gzip_is_detected_although_simpleitk_reads_it(tmp_path):
    path = _write(tmp_path / "a.nii.gz", (np.random.default_rng(0).random((40, 40, 40)) * 1000).astype(np.int16))
    check_nifti_integrity(path)
    data = path.read_bytes()
    truncated = tmp_path / "b.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    sitk.ReadImage(str(truncated))  # the reader itself raises nothing: that is why we check
    with pytest.raises(ValueError, match="truncated|corrupt"):
        check_nifti_integrity(truncated)
    # An intact gzip stream holding a short NIfTI payload is caught by the header size check.
    short = tmp_path / "c.nii.gz"
    short.write_bytes(gzip.compress(gzip.decompress(data)[:5000]))
    with pytest.raises(ValueError, match="truncated"):
        check_nifti_integrity(short)


def test_a_nifti2_file_is_refused_with_what_to_do(tmp_path):
    import nibabel

    path = tmp_path / "n2.nii.gz"
    nibabel.save(nibabel.Nifti2Image(np.ones((5, 6, 7), np.int16), np.eye(4)), str(path))
    with pytest.raises(CaseError, match=r"^case X \[.*n2.nii.gz\]: unreadable NIfTI: a NIfTI-2 file, .*as NIfTI-1$"):
        read_image(path, "X")


@pytest.mark.parametrize("header", ["nifti1", "nifti2", "big-endian"])
def test_a_label_map_carries_its_images_qform_and_sform_as_they_are(tmp_path, header):
    """An image whose sform and qform disagree lies in one place for nibabel (the sform) and another for ITK
    (here the qform): the label map written with the image's `NiftiSpace` lies where the image lies for both,
    whatever the image's header format (SimpleITK reads no NIfTI-2 file, but a future one may) and byte order;
    the same labels give the same bytes."""
    import nibabel

    sform = np.array([[-0.9, 0, 0, 100], [0, -1.1, 0, 120], [0, 0, 2.5, -50], [0, 0, 0, 1]])
    qform = sform.copy()
    qform[:3, 3] += 10
    image_class = nibabel.Nifti2Image if header == "nifti2" else nibabel.Nifti1Image
    image = image_class(np.ones((7, 6, 5), np.int16), None)
    image.set_sform(sform, code=2)
    image.set_qform(qform, code=1)
    if header == "big-endian":
        image = nibabel.Nifti1Image(image.get_fdata().astype(">i2"), None, image.header.as_byteswapped(">"))
    path = tmp_path / "image.nii.gz"
    nibabel.save(image, str(path))
    twin = tmp_path / "twin.nii.gz"  # SimpleITK reads no NIfTI-2 file: its grid from a NIfTI-1 twin
    nibabel.save(nibabel.Nifti1Image(np.asarray(image.dataobj), None, nibabel.Nifti1Header.from_header(image.header)),
                 str(twin))
    reference = sitk.ReadImage(str(twin))
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[2, 3, 4] = 2
    written = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for destination in written:
        write_image_atomic(label_image(labels, reference), destination, read_nifti_space(path))
    assert written[0].read_bytes() == written[1].read_bytes()
    ours, theirs = nibabel.load(str(written[0])), nibabel.load(str(path))
    assert np.allclose(ours.affine, theirs.affine) and np.allclose(ours.get_qform(), theirs.get_qform())
    assert [int(ours.header[f]) for f in ("qform_code", "sform_code")] == [1, 2]
    back = sitk.ReadImage(str(written[0]))
    assert back.GetPixelID() == sitk.sitkUInt8 and sitk.GetArrayFromImage(back)[2, 3, 4] == 2
    for read in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert np.allclose(getattr(back, read)(), getattr(reference, read)(), atol=1e-5), read
    plain = tmp_path / "plain.nii.gz"  # ITK's own header, for comparison: the qform's place, for nibabel too
    write_image_atomic(label_image(labels, reference), plain)
    assert not np.allclose(nibabel.load(str(plain)).affine, theirs.affine)


def test_label_image_copies_geometry_and_is_uint8(tmp_path):
    reference = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.float32))
    reference.SetSpacing((0.9, 1.1, 2.5))
    reference.SetOrigin((10.0, -20.0, 30.0))
    reference.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[2, 3, 4] = 4
    write_image_atomic(label_image(labels, reference), tmp_path / "x.nii.gz")
    back = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(back.GetSpacing(), reference.GetSpacing())
    assert np.allclose(back.GetOrigin(), reference.GetOrigin())
    assert np.allclose(back.GetDirection(), reference.GetDirection())
    assert sitk.GetArrayFromImage(back)[2, 3, 4] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


def test_label_conventions_round_trip():
    internal = np.array([0, 1, 2, 3], np.uint8)
    assert to_file_labels(internal, LabelConvention.BRATS2018).tolist() == [0, 1, 2, 4]
    assert to_file_labels(internal, LabelConvention.BRATS2023).tolist() == [0, 1, 2, 3]
    assert from_file_labels(np.array([0, 1, 2, 4])).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        from_file_labels(np.array([3, 4]))


def test_a_convention_holds_ground_truths_to_its_labels_and_says_what_a_stray_one_meant():
    """BraTS 2024's post-treatment files keep the 2023 names but mark the resection cavity 4: read without a
    convention it would be ET."""
    cavity = np.array([0, 2, 4])
    assert from_file_labels(cavity).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match=r"labels \[4\] are not in the BraTS 2023 .*resection cavity"):
        from_file_labels(cavity, LabelConvention.BRATS2023)
    assert from_file_labels(cavity, LabelConvention.BRATS2018).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match=r"labels \[3\] are not in the BraTS 2018 .*mark ET 4"):
        from_file_labels(np.array([0, 3]), LabelConvention.BRATS2018)
    with pytest.raises(ValueError, match=r"labels \[5\] are not in 0-4$"):
        from_file_labels(np.array([0, 5]))
    with pytest.raises(ValueError, match=r"labels \[5, 6, 7, 8, 9, 10, 11, 12\] and 7 more are not in 0-4$"):
        from_file_labels(np.arange(20))  # a map of another atlas: its labels named, not thousands of them
    assert from_file_labels(np.array([0.0, 1.0, 4.0], np.float32)).tolist() == [0, 1, 3]  # float, whole: fine
    with pytest.raises(ValueError, match=r"^2 label values are not whole numbers \(0\.5, 1\.25, ...\): .*nearest"):
        from_file_labels(np.array([0, 0.5, 1, 1.25, 2], np.float32))  # a map resampled by interpolation
    assert [ground_truth_convention(layout) for layout in Layout] == [LabelConvention.BRATS2023, None, None]
    names = ["BraTS-GLI-00000-000-seg.nii.gz", "BraTS2021_00000_seg.nii.gz", "X_brain_seg.nii", "seg.nii.gz",
             "BraTS-GLI-00000-000-t1c.nii.gz", "notes.txt"]
    assert [segmentation_layout(name) for name in names] == [Layout.BRATS2023, Layout.BRATS2018,
                                                             Layout.BRATS2018, Layout.TOOLKIT, None, None]


def test_load_case_zeroes_nan_with_warning_and_rejects_zero_modality(tmp_path):
    rng = np.random.default_rng(0)
    for name in LAYOUT_FILES["2023"]:
        _write(tmp_path / "c" / name.format(id="c"), rng.random((6, 7, 8)).astype(np.float32) + 1)
    flair = tmp_path / "c" / "c-t2f.nii.gz"
    array = rng.random((6, 7, 8)).astype(np.float32) + 1
    array[0, 0, 0] = np.nan
    _write(flair, array)
    [case] = find_cases(tmp_path).cases
    loaded = load_case(case)
    warning = loaded.warnings[0]  # then unstripped_border: random voxels fill the whole volume
    assert loaded.image[0, 0, 0, 0] == 0 and warning.code is WarningCode.NONFINITE_VOXELS and "NaN/Inf" in str(warning)
    _write(flair, np.zeros((6, 7, 8), np.float32))
    with pytest.raises(CaseError, match="all zero"):
        load_case(case)


def test_load_case_warns_of_flair_and_t2_files_whose_names_are_exchanged(tmp_path):
    """A BraTS-sized case read from disk earns no warning; with its t2f and t2w files' names exchanged it earns
    the swap warning, at the brain's size in millilitres that the headers' spacing gives."""
    [folder] = [Path(p) for p in generate(tmp_path / "in", 1, seed=62)]
    [case] = find_cases(tmp_path / "in").cases
    assert load_case(case).warnings == []
    flair, t2 = next(folder.glob("*-t2f.nii.gz")), next(folder.glob("*-t2w.nii.gz"))
    flair.rename(tmp_path / "flair"), t2.rename(flair), (tmp_path / "flair").rename(t2)
    [warning] = load_case(case).warnings
    assert warning.code is WarningCode.SWAPPED_FLAIR_T2 and warning.message.startswith("flair and t2 look swapped")


def test_load_case_warns_of_t1_and_t1c_files_whose_names_are_exchanged(tmp_path):
    """A BraTS-sized case whose tumour enhances earns no warning, and its enhancement shows as a long upper
    tail of z(t1c) - z(t1); with its t1n and t1c files' names exchanged the tail is the lower one, and it earns
    the swap warning."""
    [folder] = [Path(p) for p in generate(tmp_path / "in", 1, seed=63, start=2)]
    [case] = find_cases(tmp_path / "in").cases
    named_right = load_case(case)
    assert named_right.warnings == [] and named_right.checks.enhancement_asymmetry > 2
    t1, t1c = next(folder.glob("*-t1n.nii.gz")), next(folder.glob("*-t1c.nii.gz"))
    t1.rename(tmp_path / "t1"), t1c.rename(t1), (tmp_path / "t1").rename(t1c)
    swapped = load_case(case)
    [warning] = swapped.warnings
    assert warning.code is WarningCode.SWAPPED_T1_T1C and warning.message.startswith("t1 and t1c look swapped")
    assert swapped.checks.enhancement_asymmetry == pytest.approx(-named_right.checks.enhancement_asymmetry)


def test_geometry_difference_names_each_property_with_both_values():
    a = sitk.Image(8, 7, 6, sitk.sitkInt16)
    b = sitk.Image(8, 7, 6, sitk.sitkInt16)
    assert geometry_difference(a, b) is None
    b.SetOrigin((0.001, 0.0, 0.0))  # under the origin's tolerance (0.01 mm)
    b.SetSpacing((1.0, 1.0, 1.0 + 1e-6))
    assert geometry_difference(a, b) is None
    b.SetOrigin((2.0, 0.0, 0.0))
    b.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    assert geometry_difference(b, a) == ("origin (2.0, 0.0, 0.0) vs (0.0, 0.0, 0.0); direction "
                                         "(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0) vs "
                                         "(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)")
    c = sitk.Image(8, 7, 5, sitk.sitkInt16)
    assert geometry_difference(c, a) == "size (8, 7, 5) vs (8, 7, 6)"


def test_case_error_survives_pickling():
    """Training prepares cases in worker processes, whose exceptions come back pickled."""
    error = pickle.loads(pickle.dumps(CaseError("X", Path("/in/X/X-t1n.nii.gz"), "all zero")))
    assert isinstance(error, CaseError) and str(error) == "case X [/in/X/X-t1n.nii.gz]: all zero"
    assert (error.case_id, error.reason) == ("X", "all zero")


def test_partial_files_are_cleaned(tmp_path):
    (tmp_path / ".omnet-partial-123-a.nii.gz").write_bytes(b"x")
    (tmp_path / "a.nii.gz").write_bytes(b"y")
    remove_partial_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]


def test_a_second_run_starting_mid_copy_leaves_the_file_in_flight(tmp_path, monkeypatch):
    """The output folder on another filesystem than the staging folder (Docker's bind-mounted /output):
    the label map is copied under a hidden name; a second run's clean-up in the middle of that copy leaves
    it, and the map lands complete."""
    replace, copy = os.replace, shutil.copyfileobj

    def cross_device(source, target):
        if "omnet-write-" in str(source):
            raise OSError(18, "Invalid cross-device link")
        return replace(source, target)

    cleaned = []

    def copy_while_another_run_starts(source, target, length=0):
        cleaned.append(remove_partial_files(tmp_path))
        return copy(source, target, length)

    monkeypatch.setattr(os, "replace", cross_device)
    monkeypatch.setattr(shutil, "copyfileobj", copy_while_another_run_starts)
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[2, 3, 4] = 2
    write_image_atomic(label_image(labels, sitk.GetImageFromArray(labels)), tmp_path / "y.nii.gz")
    assert cleaned == [[]]
    assert [p.name for p in tmp_path.iterdir()] == ["y.nii.gz"]
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "y.nii.gz")))[2, 3, 4] == 2


def test_a_partial_file_another_run_is_writing_is_left_alone(tmp_path):
    """A second shard starting on the same output folder must not delete the first shard's file in flight:
    the writer holds a lock on it (as `write_image_atomic` does), and only an unheld one is a leftover."""
    in_flight = tmp_path / ".omnet-partial-7-b.nii.gz"
    with open(in_flight, "wb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        assert remove_partial_files(tmp_path) == [] and in_flight.exists()
    assert remove_partial_files(tmp_path) == [in_flight] and not in_flight.exists()


def test_load_case_reports_the_first_bad_modality_in_channel_order(tmp_path):
    """The modalities are read in parallel; errors still come in channel order (FLAIR, T1, T1c, T2)."""
    rng = np.random.default_rng(0)
    for name in LAYOUT_FILES["2023"]:
        _write(tmp_path / "c" / name.format(id="c"), rng.random((6, 7, 8)).astype(np.float32) + 1)
    t1c, t2 = tmp_path / "c" / "c-t1c.nii.gz", tmp_path / "c" / "c-t2w.nii.gz"
    _write(t1c, rng.random((6, 7, 8)).astype(np.float32) + 1, spacing=(2.0, 1.0, 1.0))  # third channel
    t2.write_bytes(t2.read_bytes()[:100])  # fourth channel, unreadable
    [case] = find_cases(tmp_path).cases
    with pytest.raises(CaseError, match="geometry differs") as caught:
        load_case(case)
    assert "c-t1c.nii.gz" in str(caught.value)
    _write(t1c, rng.random((6, 7, 8)).astype(np.float32) + 1)
    with pytest.raises(CaseError, match="unreadable") as caught:
        load_case(case)
    assert "c-t2w.nii.gz" in str(caught.value)


def test_simpleitk_file_calls_never_overlap(tmp_path, monkeypatch):
    """ITK's NIfTI reader fails rarely when threads read at once (SimpleITK #74): a case's four parallel
    reads and a concurrent label write must reach SimpleITK one at a time."""
    import threading
    import time

    import app.io as io

    rng = np.random.default_rng(0)
    for name in LAYOUT_FILES["2023"]:
        _write(tmp_path / "c" / name.format(id="c"), rng.random((6, 7, 8)).astype(np.float32) + 1)
    [case] = find_cases(tmp_path).cases
    inside, most, guard = [0], [0], threading.Lock()

    def tracked(call):
        def wrapper(*args, **kwargs):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)  # long enough for any unguarded overlap to show
            try:
                return call(*args, **kwargs)
            finally:
                with guard:
                    inside[0] -= 1
        return wrapper

    monkeypatch.setattr(sitk, "ReadImage", tracked(sitk.ReadImage))
    monkeypatch.setattr(sitk, "WriteImage", tracked(sitk.WriteImage))
    labels = np.zeros((6, 7, 8), np.uint8)
    writer = threading.Thread(target=lambda: [write_image_atomic(
        label_image(labels, io.sitk_read(case.reference)), tmp_path / f"out{i}.nii.gz") for i in range(5)])
    writer.start()
    loaded = [load_case(case) for _ in range(3)]
    writer.join()
    assert most[0] == 1
    assert all(np.array_equal(loaded[0].image, other.image) for other in loaded[1:])
    assert len(list(tmp_path.glob("out*.nii.gz"))) == 5


def test_one_line_gives_the_toolkits_reason_not_the_source_location(tmp_path):
    from app.errors import one_line

    with pytest.raises(RuntimeError) as missing:
        sitk.ReadImage(str(tmp_path / "absent.nii.gz"))
    assert ".cxx" in str(missing.value)  # SimpleITK's own message starts with the C++ file that threw
    assert one_line(missing.value) == f'The file "{tmp_path / "absent.nii.gz"}" does not exist.'
    with pytest.raises(RuntimeError) as unwritable:
        sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(tmp_path / "absent" / "x.nii.gz"))
    assert one_line(unwritable.value).startswith("nifti library failed to write image")  # ITK's class@address gone
    assert one_line(ValueError("first line\n  second")) == "first line"
    assert one_line(RuntimeError("  ")) == "RuntimeError"


def test_truth_recoding_applies_every_pair_at_once_and_refuses_what_it_cannot_read():
    labels = np.array([0, 1, 2, 3, 4], np.uint8)
    exchange = TruthRecoding.parse("1:3,3:1,4:0")
    assert exchange.apply(labels).tolist() == [0, 3, 2, 1, 0] and labels.tolist() == [0, 1, 2, 3, 4]
    assert str(exchange) == "1:3,3:1,4:0" and TruthRecoding.parse(str(exchange)) == exchange
    for text, message in [("4", "FROM:TO pairs"), ("4:x", "FROM:TO pairs"), ("4:0,4:1", "a label twice"),
                          ("300:0", "0-255"), ("", "FROM:TO pairs")]:
        with pytest.raises(ValueError, match=message):
            TruthRecoding.parse(text)


def test_a_background_stored_as_another_value_than_0_is_read_as_background(tmp_path):
    """Images z-scored over the whole volume store their background as one negative value: it is read as 0,
    so the brain is what it was before (one warning names each file and its value), where every voxel would
    otherwise be brain; a background of 0, and an unstripped head's varied border, are left as they are."""
    [folder] = [Path(p) for p in generate(tmp_path / "in", 1, seed=63, size=(64, 64, 48))]
    [case] = find_cases(tmp_path / "in").cases
    raw = load_case(case)
    assert raw.warnings == []
    for path in case.modalities.values():
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        scored = sitk.GetImageFromArray((array - array.mean()) / array.std())
        scored.CopyInformation(image)
        sitk.WriteImage(scored, str(path))
    loaded = load_case(case)
    [warning] = loaded.warnings
    assert warning.code is WarningCode.STORED_BACKGROUND and warning.message.startswith("background stored as")
    assert all(f"{path.name} (-0." in warning.message for path in case.modalities.values())
    np.testing.assert_array_equal(loaded.image != 0, raw.image != 0)
    assert stored_background(raw.image[0]) is None and stored_background(np.full((4, 5, 6), 3.0)) is None
    head = raw.image[0] + np.random.default_rng(0).uniform(1, 2, raw.image.shape[1:])  # a noise floor everywhere
    assert stored_background(head) is None


def _write_like(path: Path, array: np.ndarray) -> None:
    """Overwrite a NIfTI file with ``array`` (float32), keeping its geometry."""
    image = sitk.ReadImage(str(path))
    written = sitk.GetImageFromArray(array.astype(np.float32))
    written.CopyInformation(image)
    sitk.WriteImage(written, str(path))


def test_a_noise_floor_around_the_brain_is_read_as_background(tmp_path):
    """A brain stored over a Rician noise floor (every modality, at 5% of its brain's median) is read as the
    skull-stripped brain it is: none of it lost, a few specks at its surface more, its voxels as they were, and
    one warning naming each file and the floor's top. A border whose values span a tissue's (a head filling
    the volume) is left as it is, with the unstripped warning."""
    generate(tmp_path / "in", 1, seed=65, size=(64, 64, 48))
    [case] = find_cases(tmp_path / "in").cases
    raw = load_case(case)
    assert raw.warnings == []
    brain = (raw.image != 0).any(0)
    rng = np.random.default_rng(0)
    for path, channel in zip(case.modalities.values(), raw.image):
        sigma = 0.05 * np.median(channel[brain])
        floor = np.hypot(rng.normal(0, sigma, brain.shape), rng.normal(0, sigma, brain.shape))
        _write_like(path, np.where(brain, channel, floor))
    loaded = load_case(case)
    [warning] = loaded.warnings
    assert warning.code is WarningCode.NOISE_FLOOR and warning.message.startswith("a noise floor around the brain")
    assert all(f"{path.name} up to " in warning.message for path in case.modalities.values())
    found = (loaded.image != 0).any(0)
    assert not (brain & ~found).any() and 0 <= np.count_nonzero(found & ~brain) < 0.01 * np.count_nonzero(brain)
    np.testing.assert_array_equal(loaded.image[:, brain], raw.image[:, brain])

    t1 = raw.image[list(case.modalities).index(Modality.T1)]
    low, high = np.percentile(t1[brain], [5, 95])
    _write_like(case.modalities[Modality.T1], np.where(brain, t1, rng.uniform(low, high, brain.shape)))
    head = load_case(case)
    assert [w.code for w in head.warnings] == [WarningCode.UNSTRIPPED_BORDER]
    assert "is the case skull-stripped?" in head.warnings[0].message
    assert (head.image != 0).any(0).all()


def test_a_few_voxels_far_brighter_than_any_tissue_are_clipped_with_a_warning(tmp_path):
    """Twenty spikes at 1000x a T1c's maximum are clipped to 3x its 99.9th percentile, above every tissue
    voxel (one warning names the file and how many); every other voxel, and the case as generated, are read as
    they are."""
    [folder] = [Path(p) for p in generate(tmp_path / "in", 1, seed=64, size=(64, 64, 48))]
    [case] = find_cases(tmp_path / "in").cases
    raw = load_case(case)
    assert raw.warnings == [] and hot_voxel_ceiling(raw.image[2]) is None
    t1c = case.modalities[Modality.T1C]
    image = sitk.ReadImage(str(t1c))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    spikes = tuple(np.argwhere(array != 0)[::997][:20].T)
    array[spikes] = array.max() * 1000
    spiked = sitk.GetImageFromArray(array)
    spiked.CopyInformation(image)
    sitk.WriteImage(spiked, str(t1c))
    loaded = load_case(case)
    [warning] = loaded.warnings
    assert warning.code is WarningCode.HOT_VOXELS and f"{t1c.name} (20 above " in warning.message
    [ceiling] = np.unique(loaded.image[2][spikes])
    assert raw.image[2].max() < ceiling < 3 * raw.image[2].max()
    others = np.ones(array.shape, bool)
    others[spikes] = False
    np.testing.assert_array_equal(loaded.image[2][others], raw.image[2][others])
