"""BraTS case discovery, validated NIfTI reading and atomic label-map writing."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import re
import shutil
import struct
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .case_warnings import CaseWarning, WarningCode
from .conventions import (
    AUTO_LABELS,
    LABEL_CHOICES,
    LAYOUT_SEPARATOR,
    LAYOUT_TOKENS,
    MODALITY_ORDER,
    SEGMENTATION_TOKENS,
    LabelConvention,
    Layout,
    Modality,
)
from .errors import one_line
from .plausibility import HOT_VOXEL_FACTOR, ImageChecks, check_images, hot_voxel_ceiling, noise_floor, stored_background

if TYPE_CHECKING:
    import SimpleITK as sitk

# SimpleITK is imported where files are read or written, not here: training on phantoms made in memory
# imports this module (case discovery for --data) and runs where SimpleITK is absent, as on a lent GPU
# whose image lacks it (its 28 MB wheel would otherwise take the room of four carried width-16 folds).

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NIFTI1_HEADER, NIFTI2_HEADER = 348, 540  # header sizes in bytes (also each header's first field)
# Geometry may differ by float rounding between modalities written by different tools.
GEOMETRY_TOLERANCE = 1e-4
# Case folders are looked for this many levels below the input folder: a BraTS release unpacked there keeps
# its cases one level down (<release>/<case>/), and a site may sort them by centre or date below that.
MAX_CASE_DEPTH = 3
# macOS archives carry a "._<name>" metadata file beside every file (and copies of them under __MACOSX/):
# never images, although their names end like the image's.
APPLEDOUBLE_PREFIX = "._"
MACOS_METADATA_FOLDER = "__MACOSX"
# nnU-Net's raw data number a case's channels, <ID>_0000 ... <ID>_0003, which only its dataset.json maps to
# modalities (and datasets order them differently): such files are named, never guessed.
NNUNET_CHANNEL = re.compile(r"_\d{4}$")
# Temporary files we may leave in an output folder if killed mid-rename; removed at the next start.
PARTIAL_MARKER = ".omnet-partial-"


class CaseError(Exception):
    """A problem with one case: names the case and the file so the message stands on its own."""

    def __init__(self, case_id: str, path: Path | str | None, reason: str):
        self.case_id, self.path, self.reason = case_id, path, reason
        where = f" [{path}]" if path is not None else ""
        super().__init__(f"case {case_id}{where}: {reason}")

    def __reduce__(self):  # raised in a worker process (training's case preparation), it is pickled back
        return type(self), (self.case_id, self.path, self.reason)


@dataclass(frozen=True)
class CaseFiles:
    """One case found on disk: its four modality files and, in training folders, its ground truth."""

    case_id: str
    layout: Layout
    modalities: dict[Modality, Path]
    segmentation: Path | None = None

    @property
    def reference(self) -> Path:
        """The file whose geometry the output copies (FLAIR, the first channel)."""
        return self.modalities[Modality.FLAIR]


@dataclass
class Discovery:
    """What `find_cases` found: readable case specs and per-case errors that must not stop the others."""

    cases: list[CaseFiles] = field(default_factory=list)
    errors: list[CaseError] = field(default_factory=list)
    # NIfTI files outside every case whose names no BraTS layout reads: not read, and named to the user, since
    # one may be a case under names we do not know (nnU-Net's channel numbers, a site's own).
    unread: list[Path] = field(default_factory=list)


@dataclass
class LoadedCase:
    """A case's image data, channel order FLAIR, T1, T1c, T2 (array order z, y, x)."""

    files: CaseFiles
    image: np.ndarray  # (4, D, H, W) float32
    reference: sitk.Image  # geometry carrier (pixel data of the FLAIR image)
    warnings: list[CaseWarning] = field(default_factory=list)
    space: NiftiSpace | None = None  # the FLAIR header's qform and sform, which its label map carries
    checks: ImageChecks | None = None  # what the plausibility checks measured (their warnings are in ``warnings``)


# --------------------------------------------------------------------------------------------- discovery


def _strip_nifti(name: str) -> str | None:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _classify(stem: str) -> list[tuple[Layout, Modality | None, str]]:
    """Possible (layout, modality, prefix) readings of a file stem; modality None marks ground truth."""
    lower = stem.lower()
    readings: list[tuple[Layout, Modality | None, str]] = []
    for layout, separator in LAYOUT_SEPARATOR.items():
        tokens = {**LAYOUT_TOKENS[layout], **{t: None for t in SEGMENTATION_TOKENS}}
        for token, modality in tokens.items():
            tail = separator + token
            if lower.endswith(tail) and len(stem) > len(tail):
                readings.append((layout, modality, stem[: -len(tail)]))
    toolkit = {**LAYOUT_TOKENS[Layout.TOOLKIT], "seg": None}
    if lower in toolkit:
        readings.append((Layout.TOOLKIT, toolkit[lower], ""))
    # Prefer the longest token: "_brain_t1" over "_t1" (FeTS), keeping one reading per layout.
    readings.sort(key=lambda r: len(r[2]))
    best: dict[Layout, tuple[Layout, Modality | None, str]] = {}
    for reading in readings:
        best.setdefault(reading[0], reading)
    return list(best.values())


def _nifti_files(folder: Path) -> list[tuple[Path, str]]:
    entries = []
    for path in sorted(folder.iterdir()):
        stem = _strip_nifti(path.name)
        if stem is not None and path.is_file() and not path.name.startswith(APPLEDOUBLE_PREFIX):
            entries.append((path, stem))
    return entries


def validate_case_id(case_id: str) -> str:
    """Refuse IDs that could name a file outside the output folder or a hidden/odd file."""
    bad = (
        not case_id
        or case_id in {".", ".."}
        or case_id.startswith(".")
        or any(ch in case_id for ch in ("/", "\\", "\x00"))
        or ".." in case_id.split(os.sep)
    )
    if bad:
        raise CaseError(case_id or "<empty>", None, f"case ID {case_id!r} would escape or hide in the output folder")
    return case_id


def _unnamed(files: list[tuple[Path, str]]) -> list[Path]:
    """The ones of a folder's NIfTI ``files`` (`_nifti_files`) whose names no layout reads."""
    return [path for path, stem in files if not _classify(stem)]


def _assemble(case_id: str, files: list[tuple[Path, Layout, Modality | None]],
              unnamed: list[Path] | None = None) -> CaseFiles:
    """Build a case from classified files, refusing mixed layouts, duplicates and gaps; a gap's error names
    the case's ``unnamed`` files (NIfTI files beside them whose names no layout reads), one of which may be
    the missing modality under another name (MSD's "t1gd", a site's "t1post")."""
    validate_case_id(case_id)
    layouts = {layout for _, layout, _ in files}
    if len(layouts) > 1:
        names = ", ".join(sorted(p.name for p, _, _ in files))
        raise CaseError(case_id, files[0][0].parent, f"naming conventions mixed in one case ({names})")
    layout = layouts.pop()
    modalities: dict[Modality, Path] = {}
    segmentation: Path | None = None
    for path, _, modality in files:
        if modality is None:
            segmentation = path
            continue
        if modality in modalities:
            first = modalities[modality].name
            raise CaseError(case_id, path, f"two files for {modality.value}: {first} and {path.name}")
        modalities[modality] = path
    missing = [m.value for m in MODALITY_ORDER if m not in modalities]
    if missing:
        folder = files[0][0].parent
        beside = f" (beside them, named as no BraTS layout: {', '.join(p.name for p in unnamed)})" if unnamed else ""
        raise CaseError(case_id, folder, f"missing modality {', '.join(missing)}{beside}")
    ordered = {m: modalities[m] for m in MODALITY_ORDER}
    return CaseFiles(case_id, layout, ordered, segmentation)


def _case_from_files(case_id: str, files: list[tuple[Path, str]]) -> CaseFiles | None:
    """The case in a case folder whose NIfTI files are ``files`` (`_nifti_files`), or None if none of them
    is BraTS-named."""
    classified: list[tuple[Path, Layout, Modality | None]] = []
    for path, stem in files:
        readings = _classify(stem)
        if not readings:
            continue  # unknown extra file: ignored
        # A bare "t1.nii.gz" is toolkit; "<ID>_t1" is 2018; prefer a reading with a prefix.
        layout, modality, _ = readings[-1] if len(readings) > 1 else readings[0]
        classified.append((path, layout, modality))
    if not any(m is not None for _, _, m in classified):
        return None
    return _assemble(case_id, classified, _unnamed(files))


def _flat_groups(files: list[tuple[Path, str]]) -> dict[str, list[tuple[Path, Layout, Modality | None]]]:
    """The BraTS-named ones of a folder's NIfTI ``files``, grouped by their ID prefix, keeping the groups that
    hold an image (toolkit names, which have no prefix, left out)."""
    groups: dict[str, list[tuple[Path, Layout, Modality | None]]] = {}
    for path, stem in files:
        for layout, modality, prefix in _classify(stem):
            if layout is not Layout.TOOLKIT:
                groups.setdefault(prefix, []).append((path, layout, modality))
                break
    return {prefix: group for prefix, group in groups.items() if any(m is not None for _, _, m in group)}


def _add_flat_cases(groups: dict[str, list[tuple[Path, Layout, Modality | None]]], unnamed: list[Path],
                    found: Discovery) -> None:
    """Add to ``found`` the case each group of a folder's flat files (`_flat_groups`) makes, or its error, and
    the folder's ``unnamed`` files (`_unnamed`) to its unread ones."""
    found.unread.extend(unnamed)
    for prefix, group in groups.items():
        try:
            found.cases.append(_assemble(prefix, group, [p for p in unnamed if p.name.startswith(prefix)]))
        except CaseError as err:
            found.errors.append(err)


def _find_case_folders(folder: Path, depth: int, found: Discovery, searched: set[Path]) -> None:
    """Add to ``found`` the case folders among ``folder``'s subfolders; a subfolder holding no BraTS-named
    file is searched in turn, ``depth`` levels in all (``searched``: the folders already searched, so that a
    symlink loop ends). Case IDs are the case folders' names, wherever they lie; in a subfolder of flat files
    of several cases, their ID prefixes, as in the input folder itself."""
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():  # follows symlinked case folders
            continue
        try:
            files = _nifti_files(entry)
            groups = _flat_groups(files)
            if len(groups) > 1:  # flat files of several cases: each ID prefix is a case
                _add_flat_cases(groups, _unnamed(files), found)
            elif (case := _case_from_files(entry.name, files)) is not None:
                found.cases.append(case)
            elif not _skipped_folder(entry.name) and (real := entry.resolve()) not in searched:
                searched.add(real)
                found.unread.extend(_unnamed(files))
                if depth > 1:
                    _find_case_folders(entry, depth - 1, found, searched)
        except CaseError as err:
            found.errors.append(err)
        except OSError as err:  # an unreadable folder fails alone, as a bad case does
            found.errors.append(CaseError(entry.name, entry, f"cannot read the folder: {err.strerror or err}"))


def _skipped_folder(name: str) -> bool:
    """Folders never searched for cases: hidden ones (.git and the like) and a macOS archive's metadata."""
    return name.startswith(".") or name == MACOS_METADATA_FOLDER


def find_cases(input_dir: Path | str) -> Discovery:
    """Find every case under ``input_dir``: case folders (any layout) up to MAX_CASE_DEPTH levels down, and
    flat files in the folder itself or in a folder of several cases' files.

    Raises ``FileNotFoundError``/``NotADirectoryError`` for a missing input folder; per-case problems are
    returned in ``Discovery.errors`` so the other cases still run.
    """
    root = Path(input_dir)
    if not root.exists():
        raise FileNotFoundError(f"input folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"input {root} is not a folder")
    found = Discovery()
    _find_case_folders(root, MAX_CASE_DEPTH, found, {root.resolve()})
    files = _nifti_files(root)
    _add_flat_cases(_flat_groups(files), _unnamed(files), found)
    _reject_duplicate_ids(found)
    return found


def cases_with_ground_truth(folder: Path | str, left_out: list[str] | None = None,
                            unread: list[Path] | None = None) -> list[CaseFiles]:
    """The cases under ``folder`` that have a ground-truth segmentation (a training or evaluation folder); the
    IDs of those without one are appended to ``left_out`` when given, the NIfTI files outside every case that
    no layout names (`Discovery.unread`) to ``unread``.

    Unlike prediction, which runs the cases it can, a case that cannot be assembled is an error here, as is a
    folder without any case with ground truth: ValueError naming them."""
    found = find_cases(folder)
    if found.errors:
        raise ValueError("; ".join(str(e) for e in found.errors))
    cases = [c for c in found.cases if c.segmentation is not None]
    if not cases:
        note = f"; {unread_files_note(found.unread, folder)}" if found.unread else ""
        raise ValueError(f"no cases with ground truth under {folder}{note}")
    if left_out is not None:
        left_out.extend(c.case_id for c in found.cases if c.segmentation is None)
    if unread is not None:
        unread.extend(found.unread)
    return cases


def find_segmentations(folder: Path | str) -> tuple[dict[str, Path], list[CaseError]]:
    """Every ground-truth segmentation under ``folder`` by case ID, with or without the case's images (an
    evaluation's truth may be a folder of label maps only), and the errors of the IDs that cannot be used.

    Searched as `find_cases` searches: the folder and its subfolders, MAX_CASE_DEPTH levels down. IDs as
    `find_cases` gives them: a case folder's name (the folder holds one case's files), else the file's ID
    prefix. Raises ``FileNotFoundError``/``NotADirectoryError`` for a missing folder."""
    root = Path(folder)
    if not root.is_dir():
        raise (NotADirectoryError if root.exists() else FileNotFoundError)(f"ground-truth folder {root} not found")
    found: dict[str, list[Path]] = {}
    errors: list[CaseError] = []
    pending = [(root, MAX_CASE_DEPTH)]
    while pending:
        current, depth = pending.pop()
        try:
            readings = [(path, *r[-1]) for path, stem in _nifti_files(current) if (r := _classify(stem))]
            subfolders = [sub for sub in sorted(current.iterdir(), reverse=True)
                          if depth > 0 and sub.is_dir() and not _skipped_folder(sub.name)]
        except OSError as err:
            errors.append(CaseError(current.name, current, f"cannot read the folder: {err.strerror or err}"))
            continue
        one_case = current != root and len({prefix for *_, prefix in readings}) == 1
        for path, _, modality, prefix in readings:
            if modality is None and (prefix or one_case):  # a toolkit "seg.nii.gz" needs its case folder
                found.setdefault(current.name if one_case else prefix, []).append(path)
        pending += [(sub, depth - 1) for sub in subfolders]
    segmentations = {}
    for case_id, paths in sorted(found.items()):
        try:
            validate_case_id(case_id)
            if len(paths) > 1:
                raise CaseError(case_id, paths[0], f"two ground truths ({', '.join(str(p) for p in paths)})")
        except CaseError as err:
            errors.append(err)
        else:
            segmentations[case_id] = paths[0]
    return segmentations, errors


def segmentation_layout(path: Path | str) -> Layout | None:
    """The layout a ground-truth file's name follows, as `find_segmentations` reads it (None: not such a name)."""
    stem = _strip_nifti(Path(path).name)
    readings = [r for r in _classify(stem) if r[1] is None] if stem is not None else []
    return readings[-1][0] if readings else None


def unread_files_note(unread: list[Path], root: Path | str, shown: int = 3) -> str:
    """One line naming a `Discovery`'s unread files (paths relative to ``root``, the first ``shown`` of them),
    and how to name them when they carry nnU-Net's channel numbers."""
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in unread]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    note = (f"{len(names)} NIfTI file(s) outside every case were not read, named as no BraTS layout: "
            f"{', '.join(names[:shown])}{more}")
    stems = (_strip_nifti(p.name) or "" for p in unread)
    if any(NNUNET_CHANNEL.search(stem) for stem in stems):
        note += (" (names ending _0000 to _0003 number nnU-Net's channels, in the order its dataset.json sets: "
                 "rename each to its modality's BraTS name, <ID>_flair/_t1/_t1ce/_t2 or <ID>-t2f/-t1n/-t1c/-t2w)")
    return note


def _reject_duplicate_ids(found: Discovery) -> None:
    # Output files are named by ID; IDs that differ only in case collide on case-insensitive disks.
    by_key: dict[str, list[CaseFiles]] = {}
    for case in found.cases:
        by_key.setdefault(case.case_id.lower(), []).append(case)
    kept = []
    for case in found.cases:
        twins = by_key[case.case_id.lower()]
        if len(twins) > 1:
            others = ", ".join(str(t.reference.parent) for t in twins if t is not case)
            found.errors.append(CaseError(case.case_id, case.reference.parent, f"duplicate case ID (also in {others})"))
        else:
            kept.append(case)
    found.cases = kept


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _NiftiLayout:
    vox_offset: int
    data_bytes: int
    float_dtype: str | None  # numpy dtype string when the voxels are floating point


# NIfTI datatype codes of floating-point voxels (float32, float64).
_FLOAT_CODES = {16: "f4", 64: "f8"}


def _nifti_header(raw: bytes) -> _NiftiLayout:
    """Voxel offset, payload size and float dtype from a NIfTI-1 header; ValueError for a NIfTI-2 one."""
    endian, size = _header_endian(raw)
    if size == NIFTI2_HEADER:  # ITK's own message would be "Unable to determine ImageIO reader"
        raise ValueError("a NIfTI-2 file, which SimpleITK cannot read: save it as NIfTI-1")
    dims = struct.unpack(endian + "8h", raw[40:56])
    datatype, bitpix = struct.unpack(endian + "2h", raw[70:74])
    offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise ValueError(f"bad NIfTI dimension count {ndim}")
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]]))
    float_dtype = endian + _FLOAT_CODES[datatype] if datatype in _FLOAT_CODES else None
    # Data never starts inside the header or its 4-byte extension flag, whatever vox_offset says.
    return _NiftiLayout(max(offset, NIFTI1_HEADER + 4), voxels * bitpix // 8, float_dtype)


@dataclass(frozen=True)
class NiftiSpace:
    """The fields of a NIfTI header that place its voxels in space. Readers choose between the qform and the
    sform differently (nibabel takes the sform whenever its code is set, ITK the qform when only it is
    "scanner"), so a file whose two disagree means different places to different readers; a label map that
    carries its image's fields verbatim lies where the image lies for every reader."""

    pixdim: tuple[float, ...]  # qfac, then the voxel size along i, j, k
    spatial_units: int  # xyzt_units & 7
    qform_code: int
    sform_code: int
    quatern: tuple[float, ...]  # b, c, d, then the offsets x, y, z
    srow: tuple[float, ...]  # the sform's three rows, 4 numbers each


# Where each field of `NiftiSpace` sits: (pixdim, xyzt_units, qform_code, quatern_b, srow_x) offsets and the
# struct codes of a number and of a code, for NIfTI-1 and NIfTI-2 headers (sform_code follows qform_code).
_SPACE_FIELDS = {NIFTI1_HEADER: (76, 123, 252, 256, 280, "f", "h", "B"),
                 NIFTI2_HEADER: (104, 500, 344, 352, 400, "d", "i", "i")}


def _header_endian(raw: bytes | bytearray) -> tuple[str, int]:
    for endian in ("<", ">"):
        (size,) = struct.unpack(endian + "i", raw[:4])
        if size in _SPACE_FIELDS:
            return endian, size
    raise ValueError("not a NIfTI file (bad header size)")


def read_nifti_space(path: Path | str) -> NiftiSpace:
    """A NIfTI file's `NiftiSpace`, from its header alone."""
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as stream:
        raw = stream.read(NIFTI2_HEADER)
    endian, size = _header_endian(raw)
    pixdim_at, units_at, qform_at, quatern_at, srow_at, number, code, units = _SPACE_FIELDS[size]
    return NiftiSpace(
        pixdim=struct.unpack_from(f"{endian}4{number}", raw, pixdim_at),
        spatial_units=struct.unpack_from(endian + units, raw, units_at)[0] & 7,
        qform_code=struct.unpack_from(endian + code, raw, qform_at)[0],
        sform_code=struct.unpack_from(endian + code, raw, qform_at + struct.calcsize(code))[0],
        quatern=struct.unpack_from(f"{endian}6{number}", raw, quatern_at),
        srow=struct.unpack_from(f"{endian}12{number}", raw, srow_at),
    )


def _set_nifti_space(raw: bytearray, space: NiftiSpace) -> None:
    """Write ``space`` into the NIfTI header at the start of ``raw``, in that header's format and byte order."""
    endian, size = _header_endian(raw)
    pixdim_at, units_at, qform_at, quatern_at, srow_at, number, code, units = _SPACE_FIELDS[size]
    struct.pack_into(f"{endian}4{number}", raw, pixdim_at, *space.pixdim)
    time_units = struct.unpack_from(endian + units, raw, units_at)[0] & ~7
    struct.pack_into(endian + units, raw, units_at, time_units | space.spatial_units)
    struct.pack_into(f"{endian}2{code}", raw, qform_at, space.qform_code, space.sform_code)
    struct.pack_into(f"{endian}6{number}", raw, quatern_at, *space.quatern)
    struct.pack_into(f"{endian}12{number}", raw, srow_at, *space.srow)


def _read_payload(path: Path) -> bytes:
    if not path.name.lower().endswith(".gz"):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"corrupt or truncated gzip stream ({err})") from None


def check_nifti_integrity(path: Path) -> int:
    """Raise ValueError if the file is truncated, its gzip stream is corrupt or it is NIfTI-2; return the
    number of NaN/Inf voxels.

    SimpleITK returns a partly zero image from a truncated .nii.gz without any error, and reads NaN/Inf
    as 0 without saying so, so we read the whole stream once (gzip checks its CRC and length), compare its
    size with what the header promises, and count non-finite floats in the raw payload.
    """
    raw = _read_payload(path)
    if len(raw) < NIFTI1_HEADER:
        raise ValueError("file too short to be NIfTI")
    layout = _nifti_header(raw[:NIFTI1_HEADER])
    if len(raw) < layout.vox_offset + layout.data_bytes:
        raise ValueError(f"truncated: {len(raw)} bytes, header promises {layout.vox_offset + layout.data_bytes}")
    if layout.float_dtype is None:
        return 0
    voxels = np.frombuffer(raw, layout.float_dtype, layout.data_bytes // int(layout.float_dtype[-1]), layout.vox_offset)
    return int(voxels.size - np.count_nonzero(np.isfinite(voxels)))


# ITK's file readers and writers are not safe to run concurrently: four NIfTI reads in parallel threads
# fail rarely, with a corrupt string or a crash (SimpleITK issue #74, ITK issue #2003; seen here as "unreadable
# NIfTI: basic_string::_S_create" on a valid file). Every SimpleITK file call in the process takes this lock;
# the gzip integrity pass before a read (most of a read's time) still runs in parallel.
_SITK_FILE_LOCK = threading.Lock()


def sitk_read(path: Path) -> sitk.Image:
    """``sitk.ReadImage``, one at a time in this process."""
    import SimpleITK as sitk

    with _SITK_FILE_LOCK:
        return sitk.ReadImage(str(path))


def sitk_read_header(path: Path) -> sitk.ImageFileReader:
    """A reader that has read ``path``'s header only: its grid (``GetSize``, ``GetSpacing``, ``GetOrigin``,
    ``GetDirection``, as an image's) without decoding the voxels; one file call at a time in this process."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _SITK_FILE_LOCK:
        reader.ReadImageInformation()
    return reader


def sitk_write(image: sitk.Image, path: Path, compress: bool = True) -> None:
    """``sitk.WriteImage``, one at a time in this process."""
    import SimpleITK as sitk

    with _SITK_FILE_LOCK:
        sitk.WriteImage(image, str(path), compress)


def read_image(path: Path, case_id: str, warnings: list[CaseWarning] | None = None) -> sitk.Image:
    """Read one modality, checking integrity first; errors name the case and file.

    NaN/Inf voxels are read as 0 (background); a note is appended to ``warnings`` when given.
    """
    try:
        nonfinite = check_nifti_integrity(path)
        image = sitk_read(path)
    except (ValueError, RuntimeError, OSError) as err:
        raise CaseError(case_id, path, f"unreadable NIfTI: {one_line(err)}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        several = image.GetDimension() == 4 or image.GetNumberOfComponentsPerPixel() > 1
        raise CaseError(
            case_id, path,
            f"expected a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
            # The Medical Segmentation Decathlon's BraTS task stores a case's four modalities in one 4D file.
            + (": split a file of several modalities into one 3D file per modality, BraTS-named" if several else ""),
        )
    if nonfinite and warnings is not None:
        warnings.append(CaseWarning(WarningCode.NONFINITE_VOXELS,
                                    f"{path.name}: {nonfinite} NaN/Inf voxels treated as background"))
    return image


def geometry_difference(a: sitk.Image | sitk.ImageFileReader, b: sitk.Image | sitk.ImageFileReader,
                        tolerance: float = GEOMETRY_TOLERANCE) -> str | None:
    """What differs between the grids of ``a`` and ``b`` (images, or readers that have read a header: see
    `sitk_read_header`) (size, spacing, origin, direction), each property
    with both values, as ``"origin (2.0, 0.0, 0.0) vs (0.0, 0.0, 0.0)"``; None when they agree within
    ``tolerance`` (origins within 100 times it: they are in mm, and headers round them)."""
    checks = (
        ("size", a.GetSize(), b.GetSize(), 0.0, 0.0),
        ("spacing", a.GetSpacing(), b.GetSpacing(), tolerance, tolerance),
        ("origin", a.GetOrigin(), b.GetOrigin(), tolerance * 100, tolerance),
        ("direction", a.GetDirection(), b.GetDirection(), tolerance, 1e-5),
    )
    differences = [
        f"{name} {_rounded(first)} vs {_rounded(second)}"
        for name, first, second, atol, rtol in checks
        if len(first) != len(second) or not np.allclose(first, second, atol=atol, rtol=rtol)
    ]
    return "; ".join(differences) or None


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(v if isinstance(v, int) else round(float(v), 4) for v in values)  # sizes stay integers


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
    return geometry_difference(a, b, tolerance) is None


def load_case(case: CaseFiles) -> LoadedCase:
    """Read and validate a case's four modalities into one float32 array (4, D, H, W).

    NaN/Inf voxels become 0 (background) with a warning, as does a background stored as another value than 0
    (`plausibility.stored_background`) or over a noise floor (`plausibility.noise_floor`); voxels far brighter
    than any tissue are clipped, with a warning (`plausibility.hot_voxel_ceiling`); and images that may not be
    what their names say get the warnings of `plausibility.check_images`, whose measurements the case keeps;
    an all-zero modality or disagreeing geometry is an error for this case.
    """
    warnings: list[CaseWarning] = []
    reference: sitk.Image | None = None
    channels = []
    paths = list(case.modalities.values())
    # The four files' integrity passes (zlib releases the GIL) run in parallel; their ITK reads take turns
    # (see _SITK_FILE_LOCK). Results and the first error come back in modality order, as a sequential loop
    # would give them.
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        notes: list[list[CaseWarning]] = [[] for _ in paths]
        images = pool.map(read_image, paths, [case.case_id] * len(paths), notes)
        for (modality, path), image, note in zip(case.modalities.items(), images, notes):
            warnings.extend(note)
            channels.append(_checked_array(case, modality, path, image, reference))
            if reference is None:
                reference = image
    assert reference is not None
    image = np.stack(channels)
    warnings.extend(_zero_stored_background(image, paths))
    warnings.extend(_zero_noise_floor(image, paths))
    warnings.extend(_clip_hot_voxels(image, paths))
    checks = check_images(image, list(case.modalities), float(np.prod(reference.GetSpacing())) / 1000)
    warnings.extend(checks.warnings())
    try:
        space = read_nifti_space(case.reference)
    except (ValueError, OSError, EOFError) as err:  # read a moment ago: only a file replaced meanwhile
        raise CaseError(case.case_id, case.reference, f"unreadable NIfTI header: {one_line(err)}") from None
    return LoadedCase(case, image, reference, warnings, space, checks)


def _zero_stored_background(image: np.ndarray, paths: list[Path]) -> list[CaseWarning]:
    """Set each modality's background to 0, in place, where its file (of ``paths``, in channel order) stores
    it as another value (an image normalised over the whole volume): otherwise every voxel would be read as
    brain. One warning names the files and their values."""
    stored = []
    for channel, path in zip(image, paths):
        value = stored_background(channel)
        if value is not None:
            channel[channel == value] = 0
            stored.append(f"{path.name} ({value:.4g})")
    if not stored:
        return []
    return [CaseWarning(WarningCode.STORED_BACKGROUND,
                        f"background stored as a nonzero value, read as background (normalised over the whole "
                        f"volume?): {', '.join(stored)}")]


def _zero_noise_floor(image: np.ndarray, paths: list[Path]) -> list[CaseWarning]:
    """Set a case's noise floor around the brain (`plausibility.noise_floor`) to 0 in every modality, in
    place: otherwise every voxel would be read as brain. One warning names the files and the floor's top."""
    floor = noise_floor(image)
    if floor is None:
        return []
    image[:, floor.background] = 0
    named = ", ".join(f"{path.name} up to {ceiling:.4g}" for path, ceiling in zip(paths, floor.ceilings)
                      if ceiling != 0)
    return [CaseWarning(WarningCode.NOISE_FLOOR,
                        f"a noise floor around the brain ({named}) read as background, as a skull-stripped case "
                        "stores it (0); check that the case is skull-stripped")]


def _clip_hot_voxels(image: np.ndarray, paths: list[Path]) -> list[CaseWarning]:
    """Clip, in place, each modality's voxels above its `plausibility.hot_voxel_ceiling` to it (of ``paths``,
    in channel order): a few spikes would otherwise stretch its z-scores. One warning names the files."""
    clipped = []
    for channel, path in zip(image, paths):
        ceiling = hot_voxel_ceiling(channel)
        if ceiling is not None:
            hot = channel > ceiling
            clipped.append(f"{path.name} ({np.count_nonzero(hot)} above {ceiling:.4g})")
            channel[hot] = ceiling
    if not clipped:
        return []
    return [CaseWarning(WarningCode.HOT_VOXELS,
                        f"voxels far brighter than any tissue (over {HOT_VOXEL_FACTOR:g}x the 99.9th percentile) "
                        f"clipped to that: {', '.join(clipped)}")]


def _checked_array(case: CaseFiles, modality: Modality, path: Path, image: sitk.Image,
                   reference: sitk.Image | None) -> np.ndarray:
    """One modality as float32, with `load_case`'s geometry and all-zero checks."""
    difference = None if reference is None else geometry_difference(image, reference)
    if difference is not None:
        raise CaseError(case.case_id, path, f"geometry differs from {case.reference.name}: {difference}")
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.isfinite(array).all():  # other readers may pass NaN/Inf through: same rule
        array = np.where(np.isfinite(array), array, np.float32(0))
    if not np.any(array):
        raise CaseError(case.case_id, path, f"{modality.value} image is all zero")
    return array


def load_segmentation(case: CaseFiles, reference: sitk.Image | None = None) -> np.ndarray:
    """Read a case's ground truth as stored (file labels), checking its geometry against the images."""
    if case.segmentation is None:
        raise CaseError(case.case_id, case.reference.parent, "no ground-truth segmentation file")
    image = read_image(case.segmentation, case.case_id)
    difference = None if reference is None else geometry_difference(image, reference)
    if difference is not None:
        raise CaseError(case.case_id, case.segmentation,
                        f"segmentation geometry differs from the images: {difference}")
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


# --------------------------------------------------------------------------------------------- writing


def label_image(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 image with exactly the reference's size, spacing, origin and direction."""
    if labels.shape != reference.GetSize()[::-1]:
        raise ValueError(f"label map shape {labels.shape} does not match image size {reference.GetSize()[::-1]}")
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(labels.astype(np.uint8, copy=False))
    image.CopyInformation(reference)
    return image


def _write_with_space(image: sitk.Image, path: Path, space: NiftiSpace) -> None:
    """Write ``image`` to ``path`` (a .nii.gz) with the header fields of ``space`` in place of ITK's."""
    plain = path.with_name(path.name.removesuffix(".gz"))
    sitk_write(image, plain, compress=False)
    raw = bytearray(plain.read_bytes())
    plain.unlink()
    _set_nifti_space(raw, space)
    # No name and no time in the gzip header: the same labels give the same bytes.
    with open(path, "wb") as file, gzip.GzipFile(filename="", fileobj=file, mode="wb", compresslevel=6, mtime=0) as z:
        z.write(raw)


def write_image_atomic(image: sitk.Image, destination: Path, space: NiftiSpace | None = None) -> None:
    """Write ``image`` so that ``destination`` is either absent or complete, never partial; with ``space`` (a
    .nii.gz destination) its header places the voxels with those fields (see `NiftiSpace`).

    The file is encoded in a private temporary folder (outside the output folder); if that is on the same
    filesystem it is renamed into place, otherwise copied to a hidden temporary name beside the destination,
    flushed to disk, and renamed. Any leftover hidden name is removed by `remove_partial_files`.
    """
    destination = Path(destination)
    with tempfile.TemporaryDirectory(prefix="omnet-write-") as staging:
        staged = Path(staging) / destination.name
        if space is None:
            sitk_write(image, staged)
        else:
            _write_with_space(image, staged, space)
        try:
            os.replace(staged, destination)
            return
        except OSError:
            pass  # different filesystem: copy next to the destination, then rename atomically
        partial = destination.with_name(f"{PARTIAL_MARKER}{os.getpid()}-{destination.name}")
        try:
            with open(staged, "rb") as src, open(partial, "wb") as dst:
                # Held until the rename: another run starting on this output folder (a second shard)
                # cleans up only the partial files nobody holds (`remove_partial_files`).
                with contextlib.suppress(OSError):  # a filesystem without locks: written unlocked
                    fcntl.flock(dst, fcntl.LOCK_EX)
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
                os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)


def writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and write and remove a file in it; ValueError naming it (``what``: how
    the user named it, e.g. "--qc folder") when it is a file or cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{PARTIAL_MARKER}probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # a second shard starting meanwhile may have removed it
    except OSError as err:
        raise ValueError(f"{what} {folder} is not writable: {err.strerror or err}") from None


def writable_file(path: Path, what: str) -> None:
    """`writable_folder` for the folder of a file to be written at ``path``, which must not be a folder."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; it names the file to write")
    writable_folder(path.parent, f"{what}'s folder")


def remove_partial_files(output_dir: Path) -> list[Path]:
    """Delete temporary files a killed run may have left in ``output_dir``; returns what was removed.

    A partial file that another run is still writing (it holds a lock on it: shards of one cohort running
    at once into one folder) is left to that run."""
    removed = []
    for path in Path(output_dir).glob(f"{PARTIAL_MARKER}*"):
        try:
            with open(path, "rb") as file:
                if _held_by_another_run(file):
                    continue
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            continue  # renamed into place or removed meanwhile
        removed.append(path)
    return removed


def _held_by_another_run(file) -> bool:
    """Whether another process holds the lock `write_image_atomic` takes on ``file`` (False on a filesystem
    without locks, where nothing can tell)."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def output_path(output_dir: Path, case_id: str) -> Path:
    """``<output>/<ID>.nii.gz``, refusing any ID that would land elsewhere."""
    validate_case_id(case_id)
    path = Path(output_dir) / f"{case_id}.nii.gz"
    if path.resolve().parent != Path(output_dir).resolve():
        raise CaseError(case_id, None, "case ID would write outside the output folder")
    return path


def resolve_convention(requested: str, layout: Layout) -> LabelConvention:
    """``auto`` follows the case's layout (2023 files -> 0/1/2/3, otherwise 0/1/2/4)."""
    if requested == AUTO_LABELS:
        return LabelConvention.for_layout(layout)
    if requested not in LABEL_CHOICES:
        raise ValueError(f"labels must be one of {LABEL_CHOICES}, got {requested!r}")
    return LabelConvention(requested)
