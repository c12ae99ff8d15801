"""The MedPerf / MLCube form: mlcube/mlcube.yaml's `infer` task, run as MLCube's docker runner would."""

from __future__ import annotations

import shutil

import yaml

from tests.helpers import ROOT, run_cli, small_cases

MLCUBE = ROOT / "mlcube"


def _infer_command(workspace) -> list[str]:
    """The `infer` task's command line, built from mlcube.yaml the way MLCube builds it: each input and
    output parameter becomes --name=<workspace path>."""
    task = yaml.safe_load((MLCUBE / "mlcube.yaml").read_text())["tasks"]["infer"]["parameters"]
    args = ["infer"]
    for name, value in task["inputs"].items():
        args.append(f"--{name}={workspace / value}")
    for name, value in task["outputs"].items():
        path = value["default"] if isinstance(value, dict) else value
        args.append(f"--{name}={workspace / path}")
    return args


def test_mlcube_yaml_names_the_infer_task_and_its_parameters():
    config = yaml.safe_load((MLCUBE / "mlcube.yaml").read_text())
    params = config["tasks"]["infer"]["parameters"]
    assert set(params["inputs"]) == {"data_path", "parameters_file"}
    assert set(params["outputs"]) == {"output_path"}
    assert config["docker"]["image"] and (ROOT / config["docker"]["build_file"]).is_file()


def test_the_infer_task_segments_a_workspace_with_the_shipped_parameters(tmp_path):
    workspace = tmp_path / "workspace"
    shutil.copytree(MLCUBE / "workspace", workspace)
    small_cases(workspace / "data", 1)
    result = run_cli(*_infer_command(workspace))
    assert result.returncode == 0, result.stderr
    [case] = [p.name for p in (workspace / "data").iterdir()]
    assert [p.name for p in (workspace / "predictions").iterdir()] == [f"{case}.nii.gz"]
