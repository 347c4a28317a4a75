"""examples/: the Kubernetes CronJob, the systemd service and timer, and the Airflow DAG that run the nightly
steps, each checked by the tool that runs it (or its schema), and every command in them parsed by ours.

Exit statuses, the contract all three map: 0 done; 1 failed and 130 interrupted: retry; 2 refused before any
work and 3 more inputs failed than --max_error_rate: do not retry.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import REPO

EXAMPLES = os.path.join(REPO, "examples")
DO_NOT_RETRY = [2, 3]
AIRFLOW = "apache-airflow==3.3.2"
AIRFLOW_VENV = os.environ.get("AIRFLOW_VENV_DIR", os.path.join(REPO, ".cache", "airflow-venv"))


def _parses(words: list) -> None:
    """`image-embeddings WORDS` parses with the command's own parser (no work is done)."""
    from pipeline.cli import COMMANDS
    from pipeline.index.__main__ import _update_parser
    from pipeline.options import parse_known, refuse_unknown_args
    from pipeline.search.__main__ import _parser as search_parser
    from pipeline.search.__main__ import _subcommand

    command, rest = words[0], words[1:]
    assert command in COMMANDS, words
    if command == "index":
        assert rest[0] == "update"
        parse_known(_update_parser(), rest[1:])
    elif command == "search":
        parser = search_parser()
        args, beam_args = parser.parse_known_args(rest)
        refuse_unknown_args(_subcommand(parser, args.command), beam_args)
    elif command == "publish":
        from pipeline.index import __main__ as index

        with pytest.raises(SystemExit) as helped:  # publish parses inside its command: --help proves the flags
            index.main(["publish", "--help"])
        assert helped.value.code == 0
        flags = [w.split("=")[0] for w in rest if w.startswith("--")]
        assert set(flags) <= {"--index", "--to", "--table", "--full", "--ann_min_rows", "--metrics_file",
                              "--pushgateway"}, flags


def _steps(text: str) -> list:
    return [shlex.split(step) for step in text.split("&&")]


def test_the_cronjob_is_valid_for_kubernetes_and_maps_the_exit_statuses():
    import kubernetes_validate

    with open(os.path.join(EXAMPLES, "kubernetes", "cronjob.yaml")) as f:
        cronjob = yaml.safe_load(f)
    kubernetes_validate.validate(cronjob, "1.33.0", strict=True)  # the schema of Kubernetes 1.33, offline
    spec, job = cronjob["spec"], cronjob["spec"]["jobTemplate"]["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    [fail_at_once] = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail_at_once["onExitCodes"] == {"containerName": "nightly", "operator": "In", "values": DO_NOT_RETRY}
    assert job["backoffLimit"] >= 1 and job["template"]["spec"]["restartPolicy"] == "Never"
    [container] = job["template"]["spec"]["containers"]
    steps = _steps(container["args"][0])
    assert [s[:2] for s in steps] == [["image-embeddings", "index"], ["image-embeddings", "search"],
                                      ["image-embeddings", "publish"]]
    for step in steps:
        _parses(step[1:])


def test_the_systemd_units_verify_and_do_not_retry_refusals(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: apt-get install systemd (.ci/run installs it)")
    script = shutil.which("image-embeddings", path=os.path.dirname(sys.executable))
    for name in ("image-embeddings-nightly.service", "image-embeddings-nightly.timer"):
        text = open(os.path.join(EXAMPLES, "systemd", name)).read()
        # verify checks that ExecStart's program exists: the venv's, where this suite's is
        text = text.replace("/srv/image-embeddings/.venv/bin/image-embeddings", script)
        text = text.replace("WorkingDirectory=/srv/image-embeddings", f"WorkingDirectory={tmp_path}")
        text = text.replace("User=embeddings", "User=root")
        (tmp_path / name).write_text(text)
    verified = subprocess.run(["systemd-analyze", "verify", "--man=no",
                               str(tmp_path / "image-embeddings-nightly.timer"),
                               str(tmp_path / "image-embeddings-nightly.service")], capture_output=True, text=True)
    problems = [line for line in verified.stderr.splitlines() if "image-embeddings-nightly" in line]
    assert verified.returncode == 0 and not problems, verified.stderr
    service = open(os.path.join(EXAMPLES, "systemd", "image-embeddings-nightly.service")).read().splitlines()
    settings = [line.split("=", 1) for line in service if "=" in line and not line.startswith("#")]
    assert ["Type", "oneshot"] in settings and ["Restart", "on-failure"] in settings
    assert ["RestartPreventExitStatus", " ".join(map(str, DO_NOT_RETRY))] in settings
    starts = [shlex.split(value) for key, value in settings if key == "ExecStart"]
    assert [s[1] for s in starts] == ["index", "search", "publish"]
    for start in starts:
        _parses(start[1:])


@pytest.fixture(scope="session")
def airflow_python() -> str:
    """Airflow in a virtual environment of its own (never the project's: its pins are not ours), made once."""
    python = os.path.join(AIRFLOW_VENV, "bin", "python")
    stamp = os.path.join(AIRFLOW_VENV, f".installed-{AIRFLOW}")
    if not os.path.exists(stamp):
        shutil.rmtree(AIRFLOW_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", AIRFLOW_VENV], check=True)
        installed = subprocess.run([python, "-m", "pip", "install", "-q", AIRFLOW], capture_output=True, text=True)
        assert installed.returncode == 0, installed.stderr[-3000:]
        open(stamp, "w").close()
    return python


AIRFLOW_CHECK = r'''
import json, os, sys
from airflow.models.dagbag import DagBag
from airflow.exceptions import AirflowException, AirflowFailException

bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags["image_embeddings_nightly"]
[task] = [t for t in dag.tasks if not t.upstream_task_ids]
order = []
while task is not None:
    order.append(task.task_id)
    after = sorted(task.downstream_task_ids)
    task = dag.get_task(after[0]) if after else None
sys.path.insert(0, sys.argv[1])
import image_embeddings_nightly as module
outcomes = {}
for code in (0, 1, 2, 3, 130):
    with open(os.path.join(sys.argv[2], "image-embeddings"), "w") as f:
        f.write(f"#!/bin/sh\nexit {code}\n")
    os.chmod(os.path.join(sys.argv[2], "image-embeddings"), 0o755)
    try:
        module.run_command("index", "update")
        outcomes[code] = "done"
    except AirflowFailException:
        outcomes[code] = "fail, no retry"
    except AirflowException:
        outcomes[code] = "retry"
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "order": order,
                  "retries": [dag.get_task(t).retries for t in order], "max_active_runs": dag.max_active_runs,
                  "outcomes": outcomes}))
'''


def test_the_airflow_dag_loads_into_a_dagbag_and_retries_only_what_a_retry_can_fix(airflow_python, tmp_path):
    import json

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONPATH": ""}
    checked = subprocess.run([airflow_python, "-c", AIRFLOW_CHECK, os.path.join(EXAMPLES, "airflow"), str(bin_dir)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert checked.returncode == 0, checked.stderr[-3000:]
    found = json.loads(checked.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    assert found["order"] == ["index_update", "search_update", "publish"]
    assert found["retries"] == [3, 3, 3] and found["max_active_runs"] == 1
    assert found["outcomes"] == {"0": "done", "1": "retry", "2": "fail, no retry", "3": "fail, no retry",
                                 "130": "retry"}


def test_every_command_in_the_dag_parses():
    import ast

    source = open(os.path.join(EXAMPLES, "airflow", "image_embeddings_nightly.py")).read()
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "run_command"]
    assert len(calls) == 3
    for call in calls:
        words = [a.value if isinstance(a, ast.Constant) else "VALUE" for a in call.args]
        _parses(words)
