"""The predict job: every case under an input folder -> one label map per case in the output folder.

Each case is isolated: its failure is recorded and the others still run. Outputs appear atomically, so a
crash or kill never leaves a partial label map; hidden temporary names are cleaned at the next start.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import SimpleITK as sitk

from .confidence import LOW_CONFIDENCE, LOW_CONFIDENCE_WARNING, case_confidence, expected_dice
from .conventions import Modality, to_file_labels
from .inference import EnsemblePredictor, TaskProbabilities
from .io import (
    CaseError,
    CaseFiles,
    LoadedCase,
    check_nifti_integrity,
    find_cases,
    label_image,
    load_case,
    output_path,
    remove_partial_files,
    resolve_convention,
    write_image_atomic,
)
from .postprocess import PostprocessConfig, postprocess


class UsageError(Exception):
    """Bad invocation or environment: nothing can be processed (exit status 2)."""


@dataclass
class PredictOptions:
    input_dir: Path
    output_dir: Path
    labels: str = "auto"
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    skip_existing: bool = False
    save_probabilities: Path | None = None
    shard: tuple[int, int] = (0, 1)
    report: Path | None = None
    qc_dir: Path | None = None
    progress: bool = True  # a progress bar per case (terminals)
    announce: bool = False  # a "started" line per case (logs, where no bar is drawn)


@dataclass
class CaseResult:
    case_id: str
    status: str  # ok | failed | skipped
    seconds: float = 0.0
    output: str | None = None
    voxels: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    confidence: float | None = None  # mean expected Dice from the ensemble's probabilities (app/confidence.py)
    expected_dice: dict[str, float] = field(default_factory=dict)


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
    """Create and probe the output folder; refuse side outputs that would land inside it."""
    out = options.output_dir
    for name, extra in (("--report", options.report), ("--save-probabilities", options.save_probabilities),
                        ("--qc", options.qc_dir)):
        if extra is not None and _inside(Path(extra), out):
            raise UsageError(f"{name} {extra} is inside the output folder {out}, which must hold only label maps")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".omnet-partial-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"output folder {out} is not writable: {err.strerror or err}") from None
    remove_partial_files(out)


def select_shard(cases: list[CaseFiles], errors: list[CaseError], shard: tuple[int, int]):
    """The cases and discovery errors this shard owns, by position in the sorted list of all IDs."""
    ids = sorted({c.case_id for c in cases} | {e.case_id for e in errors})
    mine = set(ids[shard[0]::shard[1]])
    return [c for c in cases if c.case_id in mine], [e for e in errors if e.case_id in mine]


def _existing_output_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        check_nifti_integrity(path)
        return True
    except (ValueError, OSError):
        return False


def _voxel_counts(file_labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(file_labels.ravel(), minlength=5)
    return {str(k): int(counts[k]) for k in np.flatnonzero(counts) if k != 0}


def _save_probabilities(folder: Path, loaded: LoadedCase, box, probabilities: TaskProbabilities | None) -> None:
    """Fold-averaged task probabilities as one 7-component NIfTI (task-1 tumour, task-2 classes 0-4,
    task-3 ET) on the case's grid."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = loaded.image.shape[1:]
    stack = np.zeros((*shape, 7), np.float32)
    if probabilities is not None:
        stack[(*box, 0)] = probabilities.tumour
        stack[(*box, slice(1, 6))] = np.moveaxis(probabilities.classes, 0, -1)
        stack[(*box, 6)] = probabilities.enhancing
    image = sitk.GetImageFromArray(stack, isVector=True)
    image.CopyInformation(loaded.reference)
    write_image_atomic(image, folder / f"{loaded.files.case_id}_probabilities.nii.gz")


@dataclass
class Segmentation:
    """What the product computes for one case: internal labels (0/1/2/3) after post-processing, the
    fold-averaged probabilities over ``box`` (None for an empty brain), and the confidence read from them."""

    labels: np.ndarray
    box: tuple[slice, ...] | None
    probabilities: TaskProbabilities | None
    expected_dice: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None


def segment_image(predictor: EnsemblePredictor, image: np.ndarray, t1c_channel: int,
                  post: PostprocessConfig, progress: Callable[[int, int], None] | None = None) -> Segmentation:
    """Predict, fuse, post-process and score the confidence of a raw (4, D, H, W) case: the one path that
    `CaseRunner` and the benchmarks share."""
    internal, box, probabilities = predictor.predict_labels(image, progress, return_probabilities=True)
    internal = postprocess(internal, image[t1c_channel], post)
    result = Segmentation(internal, box, probabilities)
    if probabilities is not None:
        result.expected_dice = {k: round(v, 4) for k, v in expected_dice(probabilities, internal[box]).items()}
        result.confidence = round(case_confidence(result.expected_dice), 4)
    return result


class CaseRunner:
    """Segments one loaded case and writes its outputs; no knowledge of the CLI."""

    def __init__(self, predictor: EnsemblePredictor, options: PredictOptions):
        self.predictor, self.options = predictor, options

    def run(self, loaded: LoadedCase, progress: Callable[[int, int], None] | None = None) -> CaseResult:
        case = loaded.files
        t1c = list(case.modalities).index(Modality.T1C)
        seg = segment_image(self.predictor, loaded.image, t1c, self.options.postprocess, progress)
        convention = resolve_convention(self.options.labels, case.layout)
        file_labels = to_file_labels(seg.labels, convention)
        destination = output_path(self.options.output_dir, case.case_id)
        write_image_atomic(label_image(file_labels, loaded.reference), destination)
        if self.options.save_probabilities is not None:
            _save_probabilities(self.options.save_probabilities, loaded, seg.box, seg.probabilities)
        if self.options.qc_dir is not None:
            from .qc import save_case_picture

            save_case_picture(loaded, file_labels, convention, self.options.qc_dir)
        result = CaseResult(case.case_id, "ok", output=str(destination), voxels=_voxel_counts(file_labels),
                            warnings=list(loaded.warnings), confidence=seg.confidence,
                            expected_dice=seg.expected_dice)
        if seg.confidence is not None and seg.confidence < LOW_CONFIDENCE:
            result.warnings.append(LOW_CONFIDENCE_WARNING)
        return result


def run_predict(predictor: EnsemblePredictor, options: PredictOptions, stream: TextIO = sys.stderr) -> list[CaseResult]:
    """Process every case (of this shard); returns one result per case, failures included.

    Raises `UsageError` when there is nothing to process or the output cannot be written.
    """
    try:
        found = find_cases(options.input_dir)
    except OSError as err:
        raise UsageError(str(err)) from None
    if not found.cases and not found.errors:
        raise UsageError(f"no BraTS case found under {options.input_dir}")
    prepare_output(options)
    cases, errors = select_shard(found.cases, found.errors, options.shard)
    results = [CaseResult(e.case_id, "failed", error=str(e)) for e in errors]
    for result in results:
        _print_result(result, stream)
    runner = CaseRunner(predictor, options)
    todo = []
    for case in cases:
        try:
            destination = output_path(options.output_dir, case.case_id)
        except CaseError as err:
            results.append(_failed(case.case_id, err, stream))
            continue
        if options.skip_existing and _existing_output_ok(destination):
            result = CaseResult(case.case_id, "skipped", output=str(destination))
            _print_result(result, stream)
            results.append(result)
        else:
            todo.append(case)
    # Decode the next case's NIfTI files in a background thread while the current one computes.
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending: Future | None = reader.submit(load_case, todo[0]) if todo else None
        for i, case in enumerate(todo):
            current, pending = pending, (reader.submit(load_case, todo[i + 1]) if i + 1 < len(todo) else None)
            results.append(_run_one(runner, case, current, options, stream))
    if options.report is not None:
        write_report(results, options.report)
    return results


def _run_one(runner: CaseRunner, case: CaseFiles, future: Future, options: PredictOptions,
             stream: TextIO) -> CaseResult:
    start = time.perf_counter()
    bar = None
    if options.announce:
        print(f"{case.case_id}: started", file=stream, flush=True)
    try:
        loaded = future.result()
        if options.progress:
            from tqdm import tqdm

            bar = tqdm(total=1, desc=case.case_id, unit="tile", leave=False, file=stream, mininterval=1.0)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()
        else:
            progress = None
        result = runner.run(loaded, progress)
        result.seconds = round(time.perf_counter() - start, 2)
    except CaseError as err:
        return _failed(case.case_id, err, stream)
    except MemoryError:
        return _failed(case.case_id, CaseError(case.case_id, case.reference.parent, "out of memory"), stream)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # one case's unexpected failure must not cost the others
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return _failed(case.case_id, CaseError(case.case_id, case.reference.parent, reason), stream)
    finally:
        if bar is not None:
            bar.close()
    _print_result(result, stream)
    return result


def _failed(case_id: str, err: CaseError, stream: TextIO) -> CaseResult:
    result = CaseResult(case_id, "failed", error=str(err))
    _print_result(result, stream)
    return result


def _print_result(result: CaseResult, stream: TextIO) -> None:
    if result.status == "failed":
        line = f"FAILED {result.error}"
    elif result.status == "skipped":
        line = f"{result.case_id}: skipped (already in output)"
    else:
        voxels = " ".join(f"{k}:{v}" for k, v in result.voxels.items()) or "no tumour"
        line = f"{result.case_id}: ok {result.seconds:.1f} s, voxels {voxels}"
        if result.confidence is not None:
            line += f", confidence {result.confidence:.2f}"
        if result.warnings:
            line += f"; warnings: {'; '.join(result.warnings)}"
    print(line, file=stream, flush=True)


def write_report(results: list[CaseResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "succeeded": sum(r.status == "ok" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "cases": [asdict(r) for r in results],
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
