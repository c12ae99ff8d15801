"""Cases whose voxels are not 1 mm or that are not stored as BraTS stores a brain: the way onto the network's
grid and back (app.preprocess.Regrid, Reorientation, WorkingGrid), and the case runner that segments them
there."""

import numpy as np
import pytest
import SimpleITK as sitk

from app.case_warnings import WarningCode
from app.conventions import BRATS_DIRECTION, Layout, Modality
from app.inference import CasePrediction
from app.io import CaseFiles, LoadedCase
from app.options import BiasCorrection, Resampling
from app.pipeline import CaseRunner, CaseStatus, PredictOptions
from app.postprocess import PostprocessConfig
from app.preprocess import MAX_WORKING_SIDE, Regrid, Reorientation, WorkingGrid


def test_only_axes_coarser_than_1mm_are_resampled_to_1mm_over_the_same_millimetres():
    assert Regrid.for_case((155, 240, 240), (1.0, 1.0, 1.0)) is None
    assert Regrid.for_case((155, 240, 240), (1.04, 0.96, 1.0)) is None
    assert Regrid.for_case((155, 480, 480), (1.0, 0.5, 0.5)) is None  # finer voxels are read as they are
    regrid = Regrid.for_case((62, 480, 301), (2.5, 0.5, 0.8))
    assert regrid.working == (155, 480, 301)
    assert np.allclose(regrid.working_spacing, (1.0, 0.5, 0.8))
    assert Regrid.for_case((26, 1000, 1000), (6.0, 0.2, 0.2)).working == (156, 1000, 1000)
    with pytest.raises(ValueError, match=f"over {MAX_WORKING_SIDE} mm"):
        Regrid.for_case((155, 240, 240), (5.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="bad grid"):
        Regrid.for_case((155, 240, 240), (0.0, 1.0, 1.0))


def test_with_finer_the_finer_axes_are_shrunk_to_1mm_too():
    assert Regrid.for_case((155, 240, 240), (1.04, 0.96, 1.0), finer=True) is None
    regrid = Regrid.for_case((155, 480, 480), (1.0, 0.5, 0.5), finer=True)
    assert regrid.working == (155, 240, 240)
    regrid = Regrid.for_case((62, 480, 301), (2.5, 0.5, 0.8), finer=True)
    assert regrid.working == (155, 240, 241)
    assert np.allclose(regrid.working_spacing, (1.0, 1.0, 0.999), atol=1e-3)


TURNS = {  # the same voxels stored another way, as tools and scanners write them
    "flipped x and y (ITK's identity direction)": lambda image: sitk.DICOMOrient(image, "LPS"),
    "axes permuted": lambda image: sitk.PermuteAxes(image, [2, 0, 1]),
    "sagittal slices first": lambda image: sitk.DICOMOrient(image, "ASL"),
    "flipped and permuted": lambda image: sitk.PermuteAxes(sitk.Flip(image, [True, False, True]), [1, 2, 0]),
}


@pytest.mark.parametrize("turn", list(TURNS))
def test_a_case_stored_another_way_is_read_as_brats_stores_it_and_turned_back_exactly(turn):
    brats = sitk.GetImageFromArray(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32))
    brats.SetDirection(BRATS_DIRECTION)
    brats.SetSpacing((1.0, 1.0, 3.0))  # thick axial slices: the regrid follows them wherever they are stored
    assert Reorientation.for_direction(BRATS_DIRECTION) is None
    turned = TURNS[turn](brats)
    assert turned.GetDirection() != BRATS_DIRECTION
    array = sitk.GetArrayFromImage(turned)
    grid = WorkingGrid.for_case(array.shape, turned.GetSpacing()[::-1], turned.GetDirection())
    reference = WorkingGrid.for_case((5, 6, 7), (3.0, 1.0, 1.0), BRATS_DIRECTION)
    assert grid.reorientation is not None and grid.regrid == reference.regrid and grid.spacing == reference.spacing
    assert np.array_equal(grid.reorientation.to_working(array[None])[0], sitk.GetArrayFromImage(brats))
    assert np.array_equal(grid.to_working(array[None]), reference.to_working(sitk.GetArrayFromImage(brats)[None]))
    labels = (np.arange(np.prod(array.shape)) % 4).reshape(array.shape).astype(np.uint8)
    assert np.array_equal(grid.reorientation.to_native(grid.reorientation.to_working(labels)), labels)
    assert grid.notes()[0].code is WarningCode.REORIENTED
    assert grid.notes()[0].message.startswith("stored in another orientation")


def test_labels_come_back_exactly_when_the_working_grid_repeats_each_voxel():
    labels = np.random.default_rng(0).integers(0, 4, (6, 10, 12)).astype(np.uint8)
    regrid = Regrid.for_case(labels.shape, (2.0, 1.0, 3.0))
    assert regrid.working == (12, 10, 36)
    working = labels.repeat(2, axis=0).repeat(3, axis=2)
    assert np.array_equal(regrid.labels_to_native(working), labels)


def test_the_working_image_keeps_the_brain_s_values_to_its_edge_and_zero_outside():
    image = np.zeros((2, 20, 30, 30), np.float32)
    image[:, 4:16, 4:24, 4:24] = 7.0
    regrid = Regrid.for_case(image.shape[1:], (2.0, 1.5, 0.5))
    working = regrid.to_working(image)
    assert working.shape == (2, 40, 45, 30)
    inside = working[0] != 0
    assert np.allclose(working[:, inside], 7.0)  # no darkened rim where the brain meets the background
    assert inside.sum() == 24 * 30 * 20  # the brain's millimetres


class _BrightIsTumour:
    """Stands in for the ensemble: edema wherever FLAIR is bright, certain; remembers the grid it was given."""

    def __init__(self):
        self.shapes = []

    def predict_case(self, image, progress=None):
        self.shapes.append(image.shape[1:])
        labels = np.where(image[0] > 1.5, 2, 0).astype(np.uint8)
        box = tuple(slice(0, n) for n in labels.shape)
        tumour = (labels > 0).astype(np.float32)
        classes = np.stack([1 - tumour, np.zeros_like(tumour), tumour, np.zeros_like(tumour), np.zeros_like(tumour)])
        from app.fusion import TaskProbabilities

        return CasePrediction(labels, box, TaskProbabilities(tumour, classes, np.zeros_like(tumour)), None)


def _sphere_case(tmp_path, spacing_xyz) -> LoadedCase:
    """A brain (an ellipsoid, 1) holding a sphere of radius 12 mm (2) in every modality, on voxels of
    ``spacing_xyz`` mm over a 64 x 80 x 48 mm field of view."""
    spacing = np.array(spacing_xyz[::-1])
    shape = tuple(int(round(n / s)) for n, s in zip((48, 80, 64), spacing))
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*centres, indexing="ij")
    brain = ((z - 24) / 22) ** 2 + ((y - 40) / 36) ** 2 + ((x - 32) / 30) ** 2 <= 1
    sphere = (z - 24) ** 2 + (y - 36) ** 2 + (x - 30) ** 2 <= 12 ** 2
    channel = np.where(sphere, 2.0, np.where(brain, 1.0, 0.0)).astype(np.float32)
    reference = sitk.GetImageFromArray(channel)
    reference.SetSpacing(spacing_xyz)
    path = tmp_path / "CASE-t2f.nii.gz"
    files = CaseFiles("CASE", Layout.BRATS2023, {m: path for m in Modality})
    return LoadedCase(files, np.stack([channel] * 4), reference)


@pytest.mark.parametrize("resampling", list(Resampling))
def test_a_case_off_1mm_is_segmented_on_1mm_and_its_labels_written_on_its_own_grid(tmp_path, resampling):
    loaded = _sphere_case(tmp_path, (0.5, 0.8, 2.0))
    options = PredictOptions(tmp_path, tmp_path / "out", postprocess=PostprocessConfig.off(),
                             bias_correction=BiasCorrection.NONE, resampling=resampling,
                             save_probabilities=tmp_path / "probabilities")
    (tmp_path / "out").mkdir()
    predictor = _BrightIsTumour()
    result = CaseRunner(predictor, options).run(loaded)
    assert result.status is CaseStatus.OK
    native = loaded.image.shape[1:]
    working = {Resampling.OFF: native, Resampling.AUTO: (48, 100, 128), Resampling.ALL: (48, 80, 64)}
    assert predictor.shapes == [working[resampling]]
    written = sitk.ReadImage(str(tmp_path / "out" / "CASE.nii.gz"))
    assert written.GetSize() == loaded.reference.GetSize()
    assert np.allclose(written.GetSpacing(), (0.5, 0.8, 2.0))
    labels = sitk.GetArrayFromImage(written)
    truth = loaded.image[0] > 1.5
    assert 2 * (truth & (labels == 2)).sum() / (truth.sum() + (labels == 2).sum()) > 0.97
    probabilities = sitk.ReadImage(str(tmp_path / "probabilities" / "CASE_probabilities.nii.gz"))
    assert probabilities.GetSize() == written.GetSize() and probabilities.GetNumberOfComponentsPerPixel() == 7
    note = [w.message for w in result.warnings if w.code is WarningCode.RESAMPLED]
    grid = {Resampling.AUTO: "0.50x0.80x1.00", Resampling.ALL: "1.00x1.00x1.00"}.get(resampling)
    assert note == ([] if grid is None else
                    [f"voxels of 0.50x0.80x2.00 mm: segmented on a grid of {grid} mm and resampled back"])


def test_a_spacing_no_brain_has_fails_the_case_by_name(tmp_path):
    loaded = _sphere_case(tmp_path, (1.0, 1.0, 1.0))
    loaded.reference.SetSpacing((1.0, 1.0, 40.0))
    options = PredictOptions(tmp_path, tmp_path / "out", bias_correction=BiasCorrection.NONE)
    with pytest.raises(Exception, match="case CASE .*is not a brain's"):
        CaseRunner(_BrightIsTumour(), options).prepare(loaded)
