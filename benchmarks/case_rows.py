"""Per-case result rows as JSON Lines, for the benchmarks that score every case of a folder with ground truth
(`ensemble_analysis.py`, `fusion_grid.py`): one line per case is appended as soon as it is scored, a case
already in the file is skipped (a killed run resumes), and the summary reads every line of one or more files.
`scores` gives the Dice WT, TC, ET that a row holds."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app.io import CaseFiles, find_cases  # noqa: E402
from app.metrics import region_dice  # noqa: E402
from app.postprocess import PostprocessConfig, postprocess  # noqa: E402

REGIONS = ("WT", "TC", "ET")


def add_arguments(parser: argparse.ArgumentParser, weights_help: str) -> None:
    """The flags every such benchmark takes: input, results file, weights, threads, summary only."""
    parser.add_argument("--input", type=Path, help="folder of cases with ground truth (e.g. held-out phantoms)")
    parser.add_argument("--jsonl", type=Path, help="per-case results, appended (cases already there are skipped)")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help=weights_help)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--summary", type=Path, nargs="+", help="only print the table from these JSONL files")


def read_rows(paths: list[Path]) -> list[dict]:
    """Every row of these JSONL files, in order (a missing file is an error: a mistyped --summary path must
    not print an empty table)."""
    return [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]


def score_cases(input_dir: Path, jsonl: Path, analyse: Callable[[CaseFiles], dict]) -> None:
    """``analyse`` every case of ``input_dir`` not yet in ``jsonl`` and append its row (which names it under
    "case"), with one timing line per case on stderr."""
    done = {row["case"] for row in read_rows([jsonl])} if jsonl.is_file() else set()
    for case in find_cases(input_dir).cases:
        if case.case_id in done:
            continue
        clock = time.perf_counter()
        row = analyse(case)
        with jsonl.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(f"{case.case_id}: {time.perf_counter() - clock:.0f} s", file=sys.stderr, flush=True)


def scores(labels: np.ndarray, truth: np.ndarray, t1c: np.ndarray, post: PostprocessConfig | None = None,
           tumour_probability: np.ndarray | None = None, t1: np.ndarray | None = None) -> list[float]:
    """Dice WT, TC, ET of fused ``labels``, post-processed by ``post`` first when given (step 3's
    enhancement check reads ``t1``, step 5 the ensemble's task-1 ``tumour_probability``)."""
    if post is not None:
        labels = postprocess(labels, t1c, post, tumour_probability, t1=t1)
    dice = region_dice(labels, truth)
    return [round(dice[r], 4) for r in REGIONS]
