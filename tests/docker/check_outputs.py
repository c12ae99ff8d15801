"""Check a container's output folder against its input cases: one <ID>.nii.gz per case and nothing else,
the input's geometry, uint8, labels of the case's convention, and some tumour found."""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from app.conventions import LabelConvention  # noqa: E402
from app.io import find_cases, same_geometry  # noqa: E402


def main(input_dir: str, output_dir: str) -> int:
    cases = find_cases(input_dir).cases
    expected = sorted(f"{c.case_id}.nii.gz" for c in cases)
    present = sorted(p.name for p in Path(output_dir).iterdir())
    problems = [] if present == expected else [f"output folder holds {present}, expected {expected}"]
    for case in cases:
        path = Path(output_dir) / f"{case.case_id}.nii.gz"
        if not path.is_file():
            continue
        out, ref = sitk.ReadImage(str(path)), sitk.ReadImage(str(case.reference))
        labels = sitk.GetArrayFromImage(out)
        allowed = set(LabelConvention.for_layout(case.layout).labels)
        if out.GetPixelID() != sitk.sitkUInt8:
            problems.append(f"{path.name}: pixel type {out.GetPixelIDTypeAsString()}, expected uint8")
        if not same_geometry(out, ref, tolerance=1e-6):
            problems.append(f"{path.name}: geometry differs from {case.reference.name}")
        if not set(np.unique(labels).tolist()) <= allowed:
            problems.append(f"{path.name}: labels {sorted(np.unique(labels).tolist())} outside {sorted(allowed)}")
        if not labels.any():
            problems.append(f"{path.name}: empty label map")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    print(f"checked {len(cases)} case(s) in {output_dir}: {'ok' if not problems else 'FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
