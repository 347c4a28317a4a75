"""Running at scale as documented: every documented flag exists, the containers' environment works, models mirror.

No container registry or Docker engine is reachable here, so the images are tested as far as this machine
allows: their Dockerfiles are checked, and their Python environment is built the same way (a fresh venv
from the same requirement list) and runs a pipeline through a worker pool, as a container would.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)

from helpers import REPO, documented_commands, encode, photo, portable_services, read_embeddings, run_pipeline
from pipeline.fingerprint import model_fingerprint
from pipeline.options import build_parser, refuse_unknown_args

DOCKERFILES = {kind: os.path.join(REPO, "containers", kind, "Dockerfile") for kind in ("cpu", "gpu")}


def _requirements():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _recipe_options() -> str:
    """The options `python -m pipeline.flink up` prints and writes to FOLDER/beam-options (its own code, with
    example ports), for the docs' `$(cat /tmp/flink/beam-options)`."""
    import types

    from pipeline.flink.cluster import LocalFlink

    cluster = types.SimpleNamespace(master="localhost:40811", jar="/cache/job-server.jar", worker_port=40813)
    return " ".join(LocalFlink.beam_args(cluster))


def _documented_commands():
    """Every `pipeline.run` / `pipeline.index create|update` command in the README's and docs' code blocks."""
    return [command for command in documented_commands({"$(cat /tmp/flink/beam-options)": _recipe_options()})
            if command.startswith(("python -m pipeline.run ", "python -m pipeline.index update ",
                                   "python -m pipeline.index create "))]


def test_the_readme_documents_commands_for_every_runner():
    joined = "\n".join(_documented_commands())
    for runner in ("DataflowRunner", "FlinkRunner"):
        assert runner in joined
    assert "nvidia-l4" in joined and "--sdk_container_image" in joined and "--flink_version" in joined


@pytest.mark.parametrize("command", _documented_commands())
def test_every_documented_command_parses_with_beams_own_option_classes(command):
    optional_parts_dropped = re.sub(r"\s\[[^\]]*\]", "", command)  # [--run_size N] and [Beam options]
    words = ["PLACEHOLDER" if w == "..." else w for w in shlex.split(optional_parts_dropped)]
    prog = " ".join(words[2:4]) if "pipeline.index" in command else "pipeline.run"
    parser = build_parser(single_run=prog == "pipeline.run", with_input=prog != "pipeline.index create")
    if prog != "pipeline.run":
        parser.add_argument("--index", required=True)
    if prog == "pipeline.index update":
        parser.add_argument("--run_size")
        parser.add_argument("--max_removed")
    args, beam_args = parser.parse_known_args(words[4 if prog != "pipeline.run" else 3:])
    refuse_unknown_args(parser, beam_args)  # exits 2 on a flag neither this project nor Beam 2.77 knows
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner == "DataflowRunner":
        assert options.view_as(GoogleCloudOptions).temp_location
        machine = options.view_as(WorkerOptions).machine_type or ""
        accelerators = " ".join(options.view_as(GoogleCloudOptions).dataflow_service_options or [])
        if "nvidia-tesla-t4" in accelerators:
            assert machine.startswith("n1-"), "T4 GPUs attach only to N1 machines"
        if "nvidia-l4" in accelerators:
            assert machine.startswith("g2-"), "L4 GPUs attach only to G2 machines"
        assert "use_runner_v2" not in (options.view_as(DebugOptions).experiments or [])  # always on in 2.77


def test_setup_py_and_both_images_install_one_and_the_same_pinned_list():
    from importlib.metadata import requires

    pins = _requirements()
    installed = sorted(r.replace(" ", "") for r in requires("beam-image-embeddings") if "extra ==" not in r)
    assert installed == sorted(pins)  # setup.py's install_requires, as pip recorded it
    assert all("==" in pin for pin in pins)
    for kind, path in DOCKERFILES.items():
        text = open(path).read()
        assert "COPY requirements.txt" in text and "-r requirements.txt" in text, kind
        extra_pins = re.findall(r'"?([A-Za-z0-9_.\-\[\]]+==[0-9.]+)"?', text)
        versions = {re.split(r"[\[=]", pin)[0].lower(): pin.split("==")[1] for pin in pins}
        for pin in extra_pins:  # anything pinned beside the list must agree with it (tensorflow's CUDA extra)
            assert versions.get(re.split(r"[\[=]", pin)[0].lower()) == pin.split("==")[1], pin


def test_the_dockerfiles_start_from_the_sdk_of_this_beam_and_a_python_chosen_at_build_time_and_boot_beams_worker():
    beam = next(p.split("==")[1] for p in _requirements() if p.startswith("apache-beam"))
    sdk = f"apache/beam_python${{PYTHON_VERSION}}_sdk:{beam}"
    cpu, gpu = (open(DOCKERFILES[k]).read() for k in ("cpu", "gpu"))
    assert re.search(rf"^FROM {re.escape(sdk)}$", cpu, re.M)
    assert re.search(rf"^FROM {re.escape(sdk)} AS beam_sdk$", gpu, re.M)
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in gpu
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in gpu
    assert "python${PYTHON_VERSION} -m venv" in gpu
    for text in (cpu, gpu):  # the workers' Python is the launcher's unless a build argument says otherwise
        assert re.search(rf"^ARG PYTHON_VERSION={sys.version_info.major}\.{sys.version_info.minor}$", text, re.M)
        for image in re.findall(r"^FROM (\S+)", text, re.M):
            assert ":" in image and not image.endswith(":latest"), image
        for instruction in re.findall(r"^([A-Z]+) ", text, re.M):
            assert instruction in {"FROM", "WORKDIR", "COPY", "RUN", "ARG", "ENV", "ENTRYPOINT"}, instruction
        for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
            for path in copied.split():
                assert os.path.exists(os.path.join(REPO, path)), path


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_the_files_a_dockerfile_copies_build_the_whole_package(kind, tmp_path):
    """The image installs the project from what its COPY lines bring, so those must hold the package's metadata
    (pyproject.toml) and every package: a wheel built from exactly them has the commands and the library."""
    import shutil
    import zipfile

    with open(DOCKERFILES[kind]) as f:
        copies = re.findall(r"^COPY (?!--from)(.+) \S+$", f.read(), re.M)
    context = tmp_path / "context"
    context.mkdir()
    for path in (p for copied in copies for p in copied.split()):
        source = os.path.join(REPO, path)
        if os.path.isdir(source):
            shutil.copytree(source, context / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, context / path)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(context)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    assert wheel.name.startswith("beam_image_embeddings-")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("pipeline/run.py", "pipeline/index/__main__.py", "transforms/embed.py",
                   "beam_image_embeddings/__init__.py"):
        assert module in names, module


def test_a_mirror_has_the_models_fingerprint_and_continues_its_indexes(tmp_path, mobilenet_handle):
    destination = tmp_path / "bucket" / "models" / "mobilenet"
    result = subprocess.run([sys.executable, "-m", "pipeline.mirror", mobilenet_handle, str(destination)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    fingerprint = model_fingerprint(mobilenet_handle)
    assert f"({fingerprint})" in result.stdout and f"--model_handle {destination}" in result.stdout
    assert json.loads((destination / "mirror.json").read_text()) == {"source": mobilenet_handle,
                                                                    "fingerprint": fingerprint}
    from pipeline.index.__main__ import main as index_main

    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(encode(photo("rocket")[:64, :64], "PNG"))
    assert index_main(["create", "--index", str(tmp_path / "index"), "--model_handle", str(destination)]) == 0
    for handle in (mobilenet_handle, str(destination)):
        assert index_main(["update", "--input", str(images), "--index", str(tmp_path / "index"), "--model_handle",
                           handle, "--direct_running_mode=in_memory"]) == 0


def test_the_images_environment_built_from_the_requirement_list_runs_a_pipeline_as_a_worker_pool(tmp_path,
                                                                                                 mobilenet_handle):
    """What the Dockerfiles do, in a fresh venv: pip install -r requirements.txt, then the project, no deps."""
    venv = tmp_path / "image-env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # --no-compile: byte-compiling every file of TensorFlow was half of this test's time; imports compile what they use.
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-compile", "-r",
                              os.path.join(REPO, "requirements.txt")], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    project = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", REPO], capture_output=True,
                             text=True)
    assert project.returncode == 0, project.stderr[-3000:]
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("rocket", "coffee", "chelsea"):
        (images / f"{name}.png").write_bytes(encode(photo(name)[:90, :120], "PNG"))
    out = tmp_path / "out"
    with portable_services(python, tmp_path / "services.log") as (job_port, worker_port):
        assert run_pipeline("--input", str(images), "--output", str(out), "--model_handle", mobilenet_handle,
                            "--compiled_cache", str(tmp_path / "compiled"),
                            "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
                            "--environment_type=EXTERNAL", f"--environment_config=localhost:{worker_port}") == 0
    assert read_embeddings(str(out)).num_rows == 3
