"""The image built from the Dockerfile and run as the platforms run it (see tests/docker/image_test.sh)."""

import os
import subprocess

import pytest

from .helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.docker]  # `./tests/run_tests.sh -m "not slow"` for a quick loop

SKIP = 77


def test_image_builds_and_runs_like_the_platforms(capsys):
    """The script's progress lines go straight to the terminal (the build takes minutes)."""
    lines = []
    with capsys.disabled():
        process = subprocess.Popen(["bash", str(ROOT / "tests/docker/image_test.sh")], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            lines.append(line)
            if line.startswith(("[image-test", "Step ")):
                print(f"\n  {line.rstrip()}", end="", flush=True)
        returncode = process.wait(timeout=3600)
    output = "".join(lines)
    reason = output.strip().splitlines()[-1] if output.strip() else "no output"
    if returncode == SKIP and (os.environ.get("CI") != "true" or os.geteuid() != 0):
        pytest.skip(reason)
    assert returncode == 0, output[-6000:]
