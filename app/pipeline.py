"""The predict job: every case under an input folder -> one label map per case in the output folder.

Each case is isolated: its failure is recorded and the others still run. Outputs appear atomically, so a
crash or kill never leaves a partial label map; hidden temporary names are cleaned at the next start.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import SimpleITK as sitk
import torch

from .case_warnings import CaseWarning, cases_per_code, codes, messages
from .confidence import (
    case_confidence,
    confidence_warnings,
    dismissed_blobs,
    drawn_core_share,
    expected_dice,
    far_edema_share,
)
from .conventions import AUTO_LABELS, MODALITY_ORDER, Modality, to_file_labels
from .errors import one_line
from .fusion import TaskProbabilities, fusion_region
from .inference import CasePrediction, EnsemblePredictor
from .io import (
    MAX_CASE_DEPTH,
    CaseError,
    CaseFiles,
    LoadedCase,
    check_nifti_integrity,
    find_cases,
    geometry_difference,
    label_image,
    load_case,
    output_path,
    remove_partial_files,
    resolve_convention,
    sitk_read_header,
    unread_files_note,
    writable_file,
    writable_folder,
    write_image_atomic,
)
from .options import BiasCorrection, Resampling
from .postprocess import PostprocessConfig, postprocess
from .preprocess import BiasCorrected, WorkingGrid, correct_bias

# Where post-processing finds its images in a loaded case (`load_case` stacks the four in MODALITY_ORDER).
T1_CHANNEL = MODALITY_ORDER.index(Modality.T1)
T1C_CHANNEL = MODALITY_ORDER.index(Modality.T1C)


class UsageError(Exception):
    """Bad invocation or environment: nothing can be processed (exit status 2)."""


@dataclass
class PredictOptions:
    input_dir: Path
    output_dir: Path
    labels: str = AUTO_LABELS
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    bias_correction: BiasCorrection = BiasCorrection.N4
    resampling: Resampling = Resampling.AUTO
    skip_existing: bool = False
    save_probabilities: Path | None = None
    shard: tuple[int, int] = (0, 1)
    report: Path | None = None
    qc_dir: Path | None = None
    progress: bool = True  # a progress bar per case (terminals)
    announce: bool = False  # a "started" line per case (logs, where no bar is drawn)
    # Cases read and bias-corrected (scout and N4) by worker threads while the device runs the ensemble on an
    # earlier case; 0: each case's correction runs just before its ensemble pass, on the device's thread.
    prepare_ahead: int = 0

    def __post_init__(self) -> None:
        if self.prepare_ahead < 0:
            raise ValueError(f"prepare_ahead must be 0 or more, got {self.prepare_ahead}")


class CaseStatus(str, Enum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class CaseResult:
    case_id: str
    status: CaseStatus
    seconds: float = 0.0
    output: str | None = None
    voxels: dict[str, int] = field(default_factory=dict)
    warnings: list[CaseWarning] = field(default_factory=list)
    error: str | None = None
    confidence: float | None = None  # mean expected Dice from the ensemble's probabilities (app/confidence.py)
    expected_dice: dict[str, float] = field(default_factory=dict)
    drawn_core_share: float | None = None  # share of the core post-processing drew (app/confidence.py)
    far_edema_share: float | None = None  # share of the edema far from the core (app/confidence.py)
    image_checks: dict | None = None  # what the images' plausibility checks measured (app/plausibility.py)


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 <= I < N: this process takes every N-th case starting at the I-th."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def prepare_output(options: PredictOptions) -> None:
    """Create and probe the output folder and the side outputs' folders, before any case is read: a side
    output that would land inside the output folder, or a folder that cannot be written, is a usage error
    rather than a failure after the cases have run."""
    out = options.output_dir
    for name, extra in (("--report", options.report), ("--save-probabilities", options.save_probabilities),
                        ("--qc", options.qc_dir)):
        if extra is not None and _inside(Path(extra), out):
            raise UsageError(f"{name} {extra} is inside the output folder {out}, which must hold only label maps")
    try:
        writable_folder(out, "output folder")
        for name, folder in (("--save-probabilities", options.save_probabilities), ("--qc", options.qc_dir)):
            if folder is not None:
                writable_folder(Path(folder), f"{name} folder")
        if options.report is not None:
            writable_file(Path(options.report), "--report")
    except ValueError as err:
        raise UsageError(str(err)) from None
    remove_partial_files(out)


def select_shard(cases: list[CaseFiles], errors: list[CaseError], shard: tuple[int, int]):
    """The cases and discovery errors this shard owns, by position in the sorted list of all IDs."""
    ids = sorted({c.case_id for c in cases} | {e.case_id for e in errors})
    mine = set(ids[shard[0]::shard[1]])
    return [c for c in cases if c.case_id in mine], [e for e in errors if e.case_id in mine]


def _existing_output_ok(path: Path, case: CaseFiles) -> bool:
    """Whether ``path`` already holds this case's label map for `--skip-existing`: a complete NIfTI on the
    grid of the case's reference image (a map left from another cohort with the same IDs is redone)."""
    if not path.is_file():
        return False
    try:
        check_nifti_integrity(path)
        return geometry_difference(sitk_read_header(path), sitk_read_header(case.reference)) is None
    except (ValueError, OSError, RuntimeError):  # RuntimeError: ITK cannot read a header
        return False


def _voxel_counts(file_labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(file_labels.ravel(), minlength=5)
    return {str(k): int(counts[k]) for k in np.flatnonzero(counts) if k != 0}


def _save_probabilities(folder: Path, loaded: LoadedCase, box, probabilities: TaskProbabilities | None,
                        grid: WorkingGrid) -> None:
    """Fold-averaged task probabilities as one 7-component NIfTI (task-1 tumour, task-2 classes 0-4,
    task-3 ET) on the case's grid (brought back from the working grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    stack = np.zeros((7, *grid.working_shape(loaded.image.shape[1:])), np.float32)
    if probabilities is not None:
        stack[(0, *box)] = probabilities.tumour
        stack[(slice(1, 6), *box)] = probabilities.classes
        stack[(6, *box)] = probabilities.enhancing
    stack = grid.volume_to_native(stack)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(stack, 0, -1)), isVector=True)
    image.CopyInformation(loaded.reference)
    write_image_atomic(image, folder / f"{loaded.files.case_id}_probabilities.nii.gz", loaded.space)


@dataclass
class Segmentation:
    """What the product computes for one case: internal labels (0/1/2/3) after post-processing, the
    fold-averaged probabilities over ``box`` (None for an empty brain), the confidence read from them, the
    share of the core post-processing drew and of the edema far from the core, the seconds per stage and any
    warning (e.g. the CPU fallback, then the confidence warnings)."""

    labels: np.ndarray
    box: tuple[slice, ...] | None
    probabilities: TaskProbabilities | None
    expected_dice: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None
    drawn_core_share: float = 0.0
    far_edema_share: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[CaseWarning] = field(default_factory=list)


def segment_image(predictor: EnsemblePredictor, image: np.ndarray, post: PostprocessConfig,
                  progress: Callable[[int, int], None] | None = None,
                  bias_correction: BiasCorrection = BiasCorrection.N4,
                  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Segmentation:
    """Bias-correct, predict, fuse, post-process and score the confidence of a raw (4, D, H, W) case
    (channels in `MODALITY_ORDER`, voxels ``spacing`` mm along its axes): the one path that `CaseRunner`,
    the benchmarks and the tests share."""
    corrected, prediction = predict_corrected(predictor, image, bias_correction, progress=progress)
    return complete_segmentation(prediction, corrected, post, spacing)


def predict_corrected(predictor: EnsemblePredictor, image: np.ndarray, bias_correction: BiasCorrection,
                      names: list[str] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, CasePrediction]:
    """The device's half of a case: bias correction (which needs the tumour scout), then the ensemble on
    the corrected image. Returns that image (post-processing reads its T1c) and the prediction, whose
    timings and warnings include the correction's."""
    prepared = prepare_image(predictor, image, bias_correction, names)
    return prepared.image, predict_prepared(predictor, prepared, progress)


def prepare_image(predictor: EnsemblePredictor, image: np.ndarray, bias_correction: BiasCorrection,
                  names: list[str] | None = None) -> BiasCorrected:
    """The raw case the network and the post-processing both read: N4-corrected when asked (the K-means
    step compares T1c intensities, which a bias field skews as it skews the network's input), the field
    fitted outside the tumour a scout of the ensemble finds on the uncorrected case. Its ``seconds`` are
    the scout's and N4's."""
    clock = time.perf_counter()
    if bias_correction is BiasCorrection.N4:
        # As many modalities at a time as the threads torch was given (--threads), so the quota holds.
        prepared = correct_bias(image, names, exclude=predictor.scout_tumour(image), workers=torch.get_num_threads())
    else:
        prepared = BiasCorrected(image, [])
    prepared.seconds = time.perf_counter() - clock
    return prepared


def predict_prepared(predictor: EnsemblePredictor, prepared: BiasCorrected,
                     progress: Callable[[int, int], None] | None = None) -> CasePrediction:
    """The ensemble on a case `prepare_image` made ready; the prediction's timings and warnings include the
    correction's."""
    prediction = predictor.predict_case(prepared.image, progress)
    prediction.timings = {"bias_correction": prepared.seconds, **prediction.timings}
    prediction.warnings[:0] = prepared.warnings
    return prediction


def complete_segmentation(prediction: CasePrediction, image: np.ndarray, post: PostprocessConfig,
                          spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Segmentation:
    """The CPU half of `segment_image`: post-processing and the confidence of a fused prediction. ``image``
    is the (4, D, H, W) case the prediction was made on (channels in `MODALITY_ORDER`); post-processing
    reads its T1c and T1. ``spacing`` (mm along the array's axes) measures the edema's distance from the
    core."""
    clock = time.perf_counter()
    probability = prediction.tumour_probability() if post.drop_doubtful_components else None
    internal = postprocess(prediction.labels, image[T1C_CHANNEL], post, probability, t1=image[T1_CHANNEL])
    timings = {**prediction.timings, "postprocess": time.perf_counter() - clock}
    result = Segmentation(internal, prediction.box, prediction.probabilities, timings=timings,
                          warnings=list(prediction.warnings),
                          drawn_core_share=drawn_core_share(prediction.labels, internal),
                          far_edema_share=far_edema_share(internal, spacing))
    if prediction.probabilities is not None:
        p, final = prediction.probabilities, internal[prediction.box]
        region = fusion_region(p) if prediction.region is None else prediction.region
        region = region & ~dismissed_blobs(p, prediction.labels[prediction.box], final, region)
        expected = expected_dice(p, final, region)
        result.expected_dice = {k: round(v, 4) for k, v in expected.items()}
        result.confidence = round(case_confidence(result.expected_dice), 4)
    result.warnings += confidence_warnings(result.confidence, result.drawn_core_share, result.far_edema_share)
    return result


@dataclass
class Prepared:
    """`CaseRunner.prepare`'s part of a case: the case as read, the way between its grid and the working grid,
    and the (bias-corrected) image on the working grid that the ensemble and post-processing read."""

    loaded: LoadedCase
    grid: WorkingGrid
    corrected: BiasCorrected


@dataclass
class Predicted:
    """`CaseRunner.predict`'s half of a case: the prediction, the (bias-corrected) image it was made on, and
    the way between that image's grid and the case's."""

    prediction: CasePrediction
    image: np.ndarray
    grid: WorkingGrid


class CaseRunner:
    """Segments one loaded case and writes its outputs in three parts that consecutive cases overlap:
    `prepare` (the working grid and bias correction: the scout on the device, N4 on the CPU), `predict` (the
    ensemble, on the device) and `finish` (the CPU's: post-processing, encoding, writing). No knowledge of
    the CLI."""

    def __init__(self, predictor: EnsemblePredictor, options: PredictOptions):
        self.predictor, self.options = predictor, options

    def run(self, loaded: LoadedCase, progress: Callable[[int, int], None] | None = None) -> CaseResult:
        return self.finish(loaded, self.predict(self.prepare(loaded), progress))

    def prepare(self, loaded: LoadedCase) -> Prepared:
        """`prepare_image` on the case as BraTS stores a brain, on about 1 mm along the axes where its
        voxels are coarser (with `Resampling.ALL` also finer): `WorkingGrid`."""
        grid = self.working_grid(loaded)
        corrected = prepare_image(self.predictor, grid.to_working(loaded.image), self.options.bias_correction,
                                  [m.value for m in loaded.files.modalities])
        return Prepared(loaded, grid, corrected)

    def predict(self, prepared: Prepared, progress: Callable[[int, int], None] | None = None) -> Predicted:
        """The ensemble on a prepared case."""
        prediction = predict_prepared(self.predictor, prepared.corrected, progress)
        return Predicted(prediction, prepared.corrected.image, prepared.grid)

    def working_grid(self, loaded: LoadedCase) -> WorkingGrid:
        """The working grid the case needs under the options' `Resampling`; a `CaseError` for a spacing no
        brain has."""
        try:
            return WorkingGrid.for_case(loaded.image.shape[1:], loaded.reference.GetSpacing()[::-1],
                                        loaded.reference.GetDirection(),
                                        resample=self.options.resampling is not Resampling.OFF,
                                        finer=self.options.resampling is Resampling.ALL)
        except ValueError as err:
            raise CaseError(loaded.files.case_id, loaded.files.reference, str(err)) from None

    def finish(self, loaded: LoadedCase, predicted: Predicted) -> CaseResult:
        case, grid = loaded.files, predicted.grid
        seg = complete_segmentation(predicted.prediction, predicted.image, self.options.postprocess, grid.spacing)
        convention = resolve_convention(self.options.labels, case.layout)
        file_labels = to_file_labels(grid.labels_to_native(seg.labels), convention)
        destination = output_path(self.options.output_dir, case.case_id)
        write_image_atomic(label_image(file_labels, loaded.reference), destination, loaded.space)
        if self.options.save_probabilities is not None:
            _save_probabilities(self.options.save_probabilities, loaded, seg.box, seg.probabilities, grid)
        warnings = [*loaded.warnings, *grid.notes(), *seg.warnings]
        if self.options.qc_dir is not None:
            from .qc import save_case_picture

            # Drawn on the corrected image where it lies on the case's grid, else on the image as read.
            shown = replace(loaded, image=predicted.image) if grid.native else loaded
            confidence = [] if seg.confidence is None else [f"confidence {seg.confidence:.2f}"]
            save_case_picture(shown, file_labels, convention, self.options.qc_dir, confidence + messages(warnings))
        return CaseResult(case.case_id, CaseStatus.OK, output=str(destination), voxels=_voxel_counts(file_labels),
                          warnings=warnings, confidence=seg.confidence,
                          expected_dice=seg.expected_dice, drawn_core_share=round(seg.drawn_core_share, 4),
                          far_edema_share=round(seg.far_edema_share, 4),
                          image_checks=None if loaded.checks is None else loaded.checks.as_report())


def run_predict(predictor: EnsemblePredictor, options: PredictOptions, stream: TextIO = sys.stderr) -> list[CaseResult]:
    """Process every case (of this shard); returns one result per case, failures included.

    Three stages overlap: a reader thread decodes case i+1 while the device predicts case i and a finisher
    thread post-processes and writes case i-1. Each queue holds one case (with ``prepare_ahead`` N, N
    readers each read and bias-correct one), so memory stays flat however many cases there are, and results
    are printed in case order.

    Raises `UsageError` when there is nothing to process or the output cannot be written.
    """
    try:
        found = find_cases(options.input_dir)
    except OSError as err:
        raise UsageError(str(err)) from None
    # Our own label maps, when the output folder lies inside the input folder, are no one's lost cases.
    found.unread = [path for path in found.unread if not _inside(path, options.output_dir)]
    unread = unread_files_note(found.unread, options.input_dir) if found.unread else None
    if not found.cases and not found.errors:
        raise UsageError(f"no BraTS case found under {options.input_dir} (case folders are looked for up to "
                         f"{MAX_CASE_DEPTH} levels down; BraTS-named files directly in it form cases too)"
                         + (f"; {unread}" if unread else ""))
    prepare_output(options)
    if unread:  # perhaps cases under names we do not know: said before the cases run, not only at the end
        print(f"warning: {unread}", file=stream, flush=True)
    cases, errors = select_shard(found.cases, found.errors, options.shard)
    results = [CaseResult(e.case_id, CaseStatus.FAILED, error=str(e)) for e in errors]
    for result in results:
        _print_result(result, stream)
    todo = []
    for case in cases:
        try:
            destination = output_path(options.output_dir, case.case_id)
        except CaseError as err:
            results.append(_failed(case.case_id, err, stream))
            continue
        if options.skip_existing and _existing_output_ok(destination, case):
            result = CaseResult(case.case_id, CaseStatus.SKIPPED, output=str(destination))
            _print_result(result, stream)
            results.append(result)
        else:
            todo.append(case)
    results += _run_pipelined(CaseRunner(predictor, options), todo, options, stream)
    if options.report is not None:
        write_report(results, options.report, found.unread)
    return results


def _run_pipelined(runner: CaseRunner, todo: list[CaseFiles], options: PredictOptions,
                   stream: TextIO) -> list[CaseResult]:
    results: list[CaseResult] = []
    finishing: Future | None = None
    ahead = max(1, options.prepare_ahead)
    # With prepare_ahead the readers also correct their cases (on a GPU, N4's CPU time then overlaps the
    # ensemble's device time); the device's thread prepares what arrives unprepared.
    read = partial(_read_and_prepare, runner) if options.prepare_ahead else load_case
    with ThreadPoolExecutor(max_workers=ahead) as reader, ThreadPoolExecutor(max_workers=1) as finisher:
        pending: deque[Future] = deque(reader.submit(read, case) for case in todo[:ahead])
        for i, case in enumerate(todo):
            current = pending.popleft()
            if i + ahead < len(todo):
                pending.append(reader.submit(read, todo[i + ahead]))
            start = time.perf_counter()
            predicted = _guarded(case, partial(_predict_one, runner, case, current, options, stream))
            if finishing is not None:  # the previous case leaves the queue (and prints) before this one joins
                results.append(finishing.result())
                finishing = None
            if isinstance(predicted, CaseResult):
                _print_result(predicted, stream, options.progress)
                results.append(predicted)
            else:
                finishing = finisher.submit(_finish_one, runner, case, *predicted, start, options, stream)
        if finishing is not None:
            results.append(finishing.result())
    return results


def _read_and_prepare(runner: CaseRunner, case: CaseFiles) -> Prepared:
    return runner.prepare(load_case(case))


def _finish_one(runner: CaseRunner, case: CaseFiles, loaded: LoadedCase, predicted: Predicted, start: float,
                options: PredictOptions, stream: TextIO) -> CaseResult:
    """The finisher thread's job: post-process and write one case, then print its line at once."""
    result = _guarded(case, partial(runner.finish, loaded, predicted))
    if result.status is CaseStatus.OK:
        result.seconds = round(time.perf_counter() - start, 2)
    _print_result(result, stream, options.progress)
    return result


def _predict_one(runner: CaseRunner, case: CaseFiles, future: Future, options: PredictOptions,
                 stream: TextIO) -> tuple[LoadedCase, Predicted]:
    if options.announce:
        print(f"{case.case_id}: started", file=stream, flush=True)
    read = future.result()
    if not options.progress:
        return _predict_read(runner, read)
    from tqdm import tqdm

    with tqdm(total=1, desc=case.case_id, unit="tile", leave=False, file=stream, mininterval=1.0) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return _predict_read(runner, read, progress)  # under the bar: a correction left to this thread takes seconds


def _predict_read(runner: CaseRunner, read: LoadedCase | Prepared,
                  progress: Callable[[int, int], None] | None = None) -> tuple[LoadedCase, Predicted]:
    """The device's part of a case a reader handed over, preparing it first where the reader did not."""
    prepared = read if isinstance(read, Prepared) else runner.prepare(read)
    return prepared.loaded, runner.predict(prepared, progress)


def _guarded(case: CaseFiles, work: Callable[[], Any]) -> Any:
    """``work()``, or a failed `CaseResult` naming the case when it raises: one case's failure must not
    cost the others."""
    try:
        return work()
    except CaseError as err:
        return CaseResult(case.case_id, CaseStatus.FAILED, error=str(err))
    except MemoryError:
        reason = "out of memory"
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {one_line(err)}"
    error = CaseError(case.case_id, case.reference.parent, reason)
    return CaseResult(case.case_id, CaseStatus.FAILED, error=str(error))


def _failed(case_id: str, err: CaseError, stream: TextIO) -> CaseResult:
    result = CaseResult(case_id, CaseStatus.FAILED, error=str(err))
    _print_result(result, stream)
    return result


def _print_result(result: CaseResult, stream: TextIO, bars: bool = False) -> None:
    """One line per case; with progress ``bars`` on the stream, written above them (tqdm clears and redraws
    the bar of the case being predicted meanwhile)."""
    if result.status is CaseStatus.FAILED:
        line = f"FAILED {result.error}"
    elif result.status is CaseStatus.SKIPPED:
        line = f"{result.case_id}: skipped (already in output)"
    else:
        voxels = " ".join(f"{k}:{v}" for k, v in result.voxels.items()) or "no tumour"
        line = f"{result.case_id}: ok {result.seconds:.1f} s, voxels {voxels}"
        if result.confidence is not None:
            line += f", confidence {result.confidence:.2f}"
        if result.warnings:
            line += f"; warnings: {'; '.join(messages(result.warnings))}"
    if bars:
        from tqdm import tqdm

        tqdm.write(line, file=stream)
        stream.flush()
    else:
        print(line, file=stream, flush=True)


def write_report(results: list[CaseResult], path: Path, unread: list[Path] | None = None) -> None:
    """The run's summary as JSON: counts (of the cases carrying each warning code too), one record per case
    and the ``unread`` NIfTI files (outside every case, named as no BraTS layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "succeeded": sum(r.status is CaseStatus.OK for r in results),
        "skipped": sum(r.status is CaseStatus.SKIPPED for r in results),
        "failed": sum(r.status is CaseStatus.FAILED for r in results),
        "warning_counts": cases_per_code([r.warnings for r in results]),
        "cases": [_report_record(r) for r in results],
        "unread_files": [str(p) for p in unread or []],
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def _report_record(result: CaseResult) -> dict:
    """A case's record in the report: its fields, the warnings' messages under ``warnings`` and their codes,
    in the same order, under ``warning_codes`` (what a pipeline matches on; the messages may be reworded)."""
    record = {}
    for key, value in asdict(result).items():
        record[key] = value
        if key == "warnings":
            record[key] = messages(result.warnings)
            record["warning_codes"] = codes(result.warnings)
    return record
