import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from app.conventions import Layout, Modality
from app.io import find_cases, load_segmentation
from app.phantoms import (
    CSF,
    DEEP_GREY,
    DEFAULT_RANGES,
    GREY_MATTER,
    RANGE_PRESETS,
    WHITE_MATTER,
    WIDE_RANGES,
    PhantomMix,
    generate,
    grey_matter_share,
    make_phantom,
    preset_of_case,
)

SIZE = (96, 96, 64)


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom(5, i, SIZE) for i in range(6)]


def test_deterministic_for_a_seed():
    a, b, c = make_phantom(3, 1, SIZE), make_phantom(3, 1, SIZE), make_phantom(3, 2, SIZE)
    assert np.array_equal(a.labels, b.labels)
    assert all(np.array_equal(a.images[m], b.images[m]) for m in a.images)
    assert not np.array_equal(a.labels, c.labels)


def test_labels_are_nested_and_inside_the_brain(phantoms):
    assert any((p.labels == 3).any() for p in phantoms), "the ET checks below need a case with ET"
    for p in phantoms:
        assert set(np.unique(p.labels).tolist()) <= {0, 1, 2, 3}
        brain = p.tissue > 0
        assert not (p.labels[~brain] > 0).any()
        core = np.isin(p.labels, (1, 3))
        assert core.any()
        # The core sits inside the whole tumour: edema (or brain cut-off) wraps it, never bare background.
        shell = ndimage.binary_dilation(core, iterations=2) & ~core
        assert (p.labels[shell & brain] == 2).mean() > 0.5
        # ET lies in the core's rim: every ET voxel belongs to a core component.
        components, _ = ndimage.label(core)
        assert (components[p.labels == 3] > 0).all()


def test_some_cases_lack_et_or_are_multifocal():
    many = [make_phantom(9, i, (64, 64, 48)) for i in range(24)]
    without_et = sum(not (p.labels == 3).any() for p in many)
    multifocal = sum(ndimage.label(p.labels > 0)[1] > 1 for p in many)
    assert 0 < without_et < len(many)
    assert multifocal > 0


def _mean(p, modality, mask):
    return float(p.images[modality].astype(np.float64)[mask].mean())


def _interior(mask):
    """The mask without its border voxels, whose intensities blur and thick slices mix with neighbours."""
    return ndimage.binary_erosion(mask)


def test_contrasts_have_the_signs_of_real_mri(phantoms):
    for p in phantoms:
        normal = _interior((p.tissue == WHITE_MATTER) & (p.labels == 0))
        csf = _interior((p.tissue == CSF) & (p.labels == 0))
        edema, ncr, et = (_interior(p.labels == k) for k in (2, 1, 3))
        if edema.sum() > 20:
            assert _mean(p, Modality.FLAIR, edema) > _mean(p, Modality.FLAIR, normal)
            assert _mean(p, Modality.T2, edema) > _mean(p, Modality.T2, normal)
        if ncr.sum() > 20:
            assert _mean(p, Modality.T1C, ncr) < _mean(p, Modality.T1C, normal)
        if et.sum() > 20:
            assert _mean(p, Modality.T1C, et) > _mean(p, Modality.T1C, normal)
        assert _mean(p, Modality.T2, csf) > _mean(p, Modality.T2, normal)
        assert _mean(p, Modality.FLAIR, csf) < _mean(p, Modality.FLAIR, normal)


@pytest.mark.parametrize("seed,index", [(3, 7), (2, 3)])  # generator 2.0 drew T2 edema below the cortex here
def test_wide_edema_stays_brighter_than_grey_matter_on_t2(seed, index):
    p = make_phantom(seed, index, SIZE, ranges=WIDE_RANGES)
    edema = _interior(p.labels == 2)
    # the cortex near the tumour: the smooth bias field scales both alike there
    near_tumour = ndimage.distance_transform_edt(p.labels == 0) <= 8
    cortex = _interior((p.tissue == GREY_MATTER) & (p.labels == 0)) & near_tumour
    assert edema.sum() > 200 and cortex.sum() > 200
    assert _mean(p, Modality.T2, edema) > 1.05 * _mean(p, Modality.T2, cortex)


def test_intensities_and_dtypes_are_randomised(phantoms):
    dtypes = {p.images[m].dtype for p in phantoms for m in p.images}
    scales = [float(p.images[Modality.T1].max()) for p in phantoms]
    assert len(dtypes) > 1 and max(scales) > 1.5 * min(scales)


@pytest.mark.parametrize("layout, et_label", [(Layout.BRATS2023, 3), (Layout.BRATS2018, 4), (Layout.TOOLKIT, 4)])
def test_written_cases_are_found_with_their_ground_truth(tmp_path, layout, et_label):
    generate(tmp_path, 1, seed=5, layout=layout, size=SIZE)
    [case] = find_cases(tmp_path).cases
    assert case.layout is layout and case.segmentation is not None
    seg = load_segmentation(case)
    assert et_label in np.unique(seg) or not (make_phantom(5, 0, SIZE).labels == 3).any()
    image = sitk.ReadImage(str(case.reference))
    assert image.GetSize() == SIZE and image.GetSpacing() == (1.0, 1.0, 1.0)


def test_generator_2_spans_real_anatomy_and_its_ranges_can_be_moved():
    """The cortex holds 40-55% of the parenchyma in the training ranges (adult brains 40-60%) whatever
    thickness and folding were drawn, deep grey nuclei exist, and a thicker cortex with room for it (outside
    the training ranges, as the out-of-distribution sweep uses) makes more grey matter than a thin one."""
    size = (120, 120, 78)
    for i in range(3):
        p = make_phantom(12, i, size)
        assert 0.395 <= grey_matter_share(p.tissue) <= 0.555, i
        assert (p.tissue == DEEP_GREY).any()
    unbounded = {"grey_matter_share": (0.0, 1.0)}
    thick = make_phantom(12, 0, size, ranges=DEFAULT_RANGES.widened(cortex_thickness=(8.0, 9.0), **unbounded))
    thin = make_phantom(12, 0, size, ranges=DEFAULT_RANGES.widened(cortex_thickness=(2.0, 2.5), **unbounded))
    assert grey_matter_share(thick.tissue) > 0.6 and grey_matter_share(thin.tissue) < 0.4
    bounded = make_phantom(12, 0, size, ranges=DEFAULT_RANGES.widened(cortex_thickness=(8.0, 9.0)))
    assert grey_matter_share(bounded.tissue) == pytest.approx(0.55, abs=0.005)
    # Only the cortex's inner border moved: the brain, its CSF and the ventricles are the thick draw's.
    moved = bounded.tissue != thick.tissue
    assert set(np.unique(thick.tissue[moved])) <= {GREY_MATTER, WHITE_MATTER}


def test_wide_ranges_contain_the_training_ranges_and_leave_them():
    """The `wide` preset keeps every training range inside its own and stretches the appearance and anatomy
    beyond it; the tumour's own ranges stay."""
    from dataclasses import fields

    stretched = []
    for f in fields(DEFAULT_RANGES):
        train, wide = getattr(DEFAULT_RANGES, f.name), getattr(WIDE_RANGES, f.name)
        if f.name == "contrast":
            for m in train:
                for tissue, (low, high) in train[m].items():
                    assert wide[m][tissue][0] <= low and wide[m][tissue][1] >= high, (m, tissue)
                    if wide[m][tissue] != (low, high):
                        stretched.append((m.value, tissue))
        elif isinstance(train, tuple):
            assert wide[0] <= train[0] and wide[1] >= train[1], f.name
            if wide != train:
                stretched.append(f.name)
        elif wide != train:
            stretched.append(f.name)
    assert {"cortex_thickness", "grey_matter_share", "bias_strength", "noise", "blur_sigma",
            "thick_slice_probability"} <= set(stretched)
    assert ("flair", GREY_MATTER) in stretched and ("t2", GREY_MATTER) in stretched
    assert WIDE_RANGES.tumour_core_radius == DEFAULT_RANGES.tumour_core_radius


def test_phantoms_command_writes_the_wide_preset_deterministically(tmp_path):
    """`python -m app phantoms --ranges wide`: the same seed gives the same cases again, other cases than
    the training ranges give, with labels the product reads."""
    from .helpers import python_cli

    runs = {}
    for name, ranges in [("wide_a", "wide"), ("wide_b", "wide"), ("training", "training")]:
        result = python_cli("phantoms", "--out", str(tmp_path / name), "--n", "1", "--seed", "9", "--size",
                            "64,64,40", "--ranges", ranges)
        assert result.returncode == 0, result.stderr
        [case] = find_cases(tmp_path / name).cases
        runs[name] = (sitk.GetArrayFromImage(sitk.ReadImage(str(case.modalities[Modality.FLAIR]))),
                      load_segmentation(case))
    assert np.array_equal(runs["wide_a"][0], runs["wide_b"][0])
    assert np.array_equal(runs["wide_a"][1], runs["wide_b"][1])
    assert not np.array_equal(runs["wide_a"][0], runs["training"][0])
    bad = python_cli("phantoms", "--out", str(tmp_path / "bad"), "--n", "1", "--ranges", "widest")
    assert bad.returncode == 2 and "--ranges" in bad.stderr
    mixed = python_cli("phantoms", "--out", str(tmp_path / "mixed"), "--n", "2", "--seed", "9", "--size",
                       "64,64,40", "--ranges", "mixed")
    assert mixed.returncode == 0, mixed.stderr
    by_id = {case.case_id: case for case in find_cases(tmp_path / "mixed").cases}
    assert sorted(by_id) == ["BraTS-PHA-00900-000", "BraTS-PHW-00901-000"]
    assert np.array_equal(load_segmentation(by_id["BraTS-PHA-00900-000"]), runs["training"][1])


def _flair_cortex_over_edema(p):
    """FLAIR's mean in the cortex near the tumour over its mean in the edema (the smooth bias field scales
    both alike there), or None where either region is too small to read."""
    edema = _interior(p.labels == 2)
    near_tumour = ndimage.distance_transform_edt(p.labels == 0) <= 10
    cortex = _interior((p.tissue == GREY_MATTER) & (p.labels == 0)) & near_tumour
    if edema.sum() < 200 or cortex.sum() < 100:
        return None
    return _mean(p, Modality.FLAIR, cortex) / _mean(p, Modality.FLAIR, edema)


def test_bright_cortex_draws_the_cortex_as_bright_as_edema_on_flair_only():
    """`bright_cortex` redraws grey matter's FLAIR mean near edema's in that share of the cases; the anatomy,
    the tumour and the other presets stay as they were (0 is every preset's value)."""
    from app.options import PhantomPreset

    for preset in PhantomPreset:
        for index in (0, 1):
            assert PhantomMix(preset).ranges_of_case(index) is RANGE_PRESETS[preset_of_case(preset, index)]
    assert PhantomMix(bright_cortex=30).ranges_of_case(0).bright_cortex_probability == 0.3
    with pytest.raises(ValueError, match="whole percentage"):
        PhantomMix(bright_cortex=101)
    cases = {share: [make_phantom(11, i, SIZE, ranges=PhantomMix(bright_cortex=share).ranges_of_case(0))
                     for i in range(6)] for share in (0, 100)}
    for plain, bright in zip(cases[0], cases[100]):
        assert np.array_equal(plain.labels, bright.labels) and np.array_equal(plain.tissue, bright.tissue)
    ratios = {share: [_flair_cortex_over_edema(p) for p in drawn] for share, drawn in cases.items()}
    readable = [i for i in range(6) if ratios[0][i] is not None and ratios[100][i] is not None]
    assert len(readable) >= 3, ratios
    for i in readable:  # drawn at 0.85-1.05x edema; blur and texture spread the measured ratio a little
        assert 0.75 < ratios[100][i] < 1.15, (i, ratios)
    assert np.mean([ratios[0][i] for i in readable]) < np.mean([ratios[100][i] for i in readable]) - 0.1, ratios


def test_phantoms_command_bright_cortex_share_is_in_the_case_id_and_validated(tmp_path):
    from .helpers import python_cli

    made = python_cli("phantoms", "--out", str(tmp_path / "bright"), "--n", "1", "--seed", "9", "--size",
                      "64,64,40", "--bright-cortex", "100", "--convention", "toolkit")
    assert made.returncode == 0, made.stderr
    assert [c.case_id for c in find_cases(tmp_path / "bright").cases] == ["PhantomC100_009_000"]
    bad = python_cli("phantoms", "--out", str(tmp_path / "bad"), "--n", "1", "--bright-cortex", "101")
    assert bad.returncode == 2 and "--bright-cortex" in bad.stderr and not (tmp_path / "bad").exists()


def test_bright_cortex_share_is_the_share_of_cases_redrawn():
    """At 30% about 30% of the cases get grey matter's FLAIR mean at 0.85-1.05x edema's and deep grey matter
    between white and grey matter; every other mean, and every other modality, is drawn as without it."""
    from app.phantoms import _DGM, _ED, _GM, _tissue_means

    ranges = PhantomMix(bright_cortex=30).ranges_of_case(0)
    redrawn = 0
    for k in range(400):
        plain = _tissue_means(np.random.default_rng(k), Modality.FLAIR, DEFAULT_RANGES)
        bright = _tissue_means(np.random.default_rng(k), Modality.FLAIR, ranges)
        others = [t for t in range(len(plain)) if t not in (_GM, _DGM)]
        assert np.array_equal(plain[others], bright[others])
        if bright[_GM] != plain[_GM]:
            redrawn += 1
            assert 0.85 <= bright[_GM] / bright[_ED] <= 1.05 and 1.0 < bright[_DGM] < bright[_GM]
    assert 0.22 < redrawn / 400 < 0.38
    for k in range(50):
        assert np.array_equal(_tissue_means(np.random.default_rng(k), Modality.T2, DEFAULT_RANGES),
                              _tissue_means(np.random.default_rng(k), Modality.T2, ranges))


def _core_over_edema(p, modality):
    """``modality``'s mean in the tumour core over its mean in the edema, read inside each region."""
    return _mean(p, modality, _interior(p.labels == 1)) / _mean(p, modality, _interior(p.labels == 2))


def test_bright_core_draws_tumours_without_et_with_a_core_as_bright_as_edema():
    """`bright_core` draws that share of the cases without ET and gives each a core as bright as or brighter
    than its edema on FLAIR and T2; at 0 (every preset's value) the generator draws as it did."""
    from app.options import PhantomPreset

    ranges = PhantomMix(bright_core=40).ranges_of_case(0)
    assert ranges.non_enhancing_share == 0.4 and ranges.bright_non_enhancing_core
    assert PhantomMix(PhantomPreset.WIDE).ranges_of_case(1) is WIDE_RANGES
    with pytest.raises(ValueError, match="bright-core share must be a whole percentage"):
        PhantomMix(bright_core=101)
    every = PhantomMix(bright_core=100).ranges_of_case(0)
    readable = 0
    for i in range(4):
        p = make_phantom(13, i, SIZE, ranges=every)
        assert not (p.labels == 3).any() and (p.labels == 1).any()
        if _interior(p.labels == 1).sum() > 50 and _interior(p.labels == 2).sum() > 200:
            readable += 1  # drawn at 0.95-1.4x (FLAIR) and 1.0-1.4x (T2); blur and texture spread it a little
            assert _core_over_edema(p, Modality.FLAIR) > 0.85 and _core_over_edema(p, Modality.T2) > 0.9
    assert readable >= 2


def test_bright_core_redraws_only_the_cores_flair_and_t2_means():
    from app.phantoms import _ED, _NCR, _tissue_means

    ranges = PhantomMix(bright_core=40).ranges_of_case(0)
    for k in range(50):
        for modality in Modality:
            plain = _tissue_means(np.random.default_rng(k), modality, ranges)
            bright = _tissue_means(np.random.default_rng(k), modality, ranges, bright_core=True)
            others = [t for t in range(len(plain)) if t != _NCR]
            assert np.array_equal(plain[others], bright[others])
            if modality in (Modality.FLAIR, Modality.T2):
                low = 0.95 if modality is Modality.FLAIR else 1.0
                assert low <= bright[_NCR] / bright[_ED] <= 1.4
            else:
                assert bright[_NCR] == plain[_NCR]


def test_phantoms_command_bright_core_share_is_in_the_case_id_and_validated(tmp_path):
    from .helpers import python_cli

    made = python_cli("phantoms", "--out", str(tmp_path / "bright"), "--n", "1", "--seed", "9", "--size",
                      "64,64,40", "--bright-cortex", "50", "--bright-core", "100", "--convention", "toolkit")
    assert made.returncode == 0, made.stderr
    [case] = find_cases(tmp_path / "bright").cases
    assert case.case_id == "PhantomC50K100_009_000"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case.segmentation)))
    assert 4 not in np.unique(labels) and 1 in np.unique(labels)  # no ET (toolkit layout: ET would be 4)
    bad = python_cli("phantoms", "--out", str(tmp_path / "bad"), "--n", "1", "--bright-core", "101")
    assert bad.returncode == 2 and "--bright-core" in bad.stderr and not (tmp_path / "bad").exists()

