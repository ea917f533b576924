"""The placement examples of deploy/: a Kubernetes Indexed Job, a systemd template unit, a Slurm
array script. Each is parsed as its engine reads it, and the `reembed run` it starts is parsed by
reembed's own command line (an option renamed in the CLI fails here, not on a cluster)."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from reembed.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _parses_as_a_worker_run(argv: list[str]) -> None:
    """The command is `reembed run ...`, valid for reembed's parser, and it waits to join."""
    assert argv[0].endswith("reembed") and argv[1] == "run", argv
    args = build_parser().parse_args(argv[1:])
    assert args.command_name == "run" and args.no_confirm
    assert args.join_wait not in (None, "0s"), "workers started together must wait for the first"
    from reembed.settings import Settings

    assert Settings.from_args(args).options.join, "the same command started again must join the job"
    assert args.device.startswith("cuda")


def test_the_kubernetes_indexed_job_runs_one_gpu_per_pod_and_the_same_reembed_run() -> None:
    (doc,) = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "reembed-indexed-job.yaml").read_text()))
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "Job"
    spec = doc["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(e["name"] == "REEMBED_DSN" for e in container["env"])
    _parses_as_a_worker_run(container["command"])
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailIndex" and rule["onExitCodes"]["values"] == [2]


def test_the_systemd_template_unit_runs_one_worker_per_instance() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "systemd" / "reembed@.service").read_text())
    service = unit["Service"]
    assert "%i" in service["ExecStart"] and service["KillSignal"] == "SIGTERM"
    assert service["SuccessExitStatus"] == "75" and set(service["RestartPreventExitStatus"].split()) == {"2", "3"}
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    command = service["ExecStart"].replace("%i", "1")
    command = re.sub(r"\$\{(\w+)\}", lambda m: f"/srv/{m.group(1).lower()}", command)
    _parses_as_a_worker_run(shlex.split(command))
    if shutil.which("systemd-analyze"):  # where systemd is at hand, its own check as well
        result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                                 str(DEPLOY / "systemd" / "reembed@.service")], capture_output=True, text=True)
        assert "Invalid" not in result.stderr and "Unknown" not in result.stderr, result.stderr


def test_the_slurm_array_script_is_valid_bash_with_one_gpu_per_task() -> None:
    path = DEPLOY / "slurm" / "reembed-array.sbatch"
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.MULTILINE))
    assert re.fullmatch(r"\d+-\d+", directives["array"]) and directives["gres"] == "gpu:1"
    assert directives["signal"].startswith("B:TERM@") and "requeue" in directives
    command = text[text.index("exec reembed run"):].replace("\\\n", " ").splitlines()[0]
    command = command.replace('"$REEMBED_MODEL"', "/models/m").removeprefix("exec ")
    _parses_as_a_worker_run(shlex.split(command))


@pytest.mark.parametrize("argv", [
    ["reembed", "run", "--model", "m", "--workers", "3", "--devices", "cuda:0,cuda:1,cuda:2", "--json",
     "--metrics-file", "/x.prom", "--max-runtime", "2h", "--batch-size", "64"],
    ["reembed", "run", "--model=m", "--workers=3", "--devices=cuda:0,cuda:1", "--json", "--metrics-file=/x.prom",
     "--batch-size=64"],
])
def test_a_workers_own_command_line_is_the_operators_less_what_the_first_process_keeps(argv: list[str]) -> None:
    from reembed.fleet import child_command_line

    child = child_command_line(argv[1:], device="cuda:1", tokenizers=2, seconds_left=3599.5)
    args = build_parser().parse_args(child[3:])
    assert args.workers == 1 and args.devices is None and not args.json and args.metrics_file is None
    assert args.device == "cuda:1" and args.tokenizer_workers == 2 and args.no_confirm
    assert args.max_runtime == "3599s" and args.batch_size == 64 and args.model == "m"
