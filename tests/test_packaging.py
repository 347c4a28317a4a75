"""setup.py builds an sdist that installs on its own and runs the pipeline, as Dataflow's --setup_file does."""

import os
import subprocess
import sys
import sysconfig
import tarfile

from helpers import REPO, SAMPLES, read_embeddings


def test_sdist_installs_into_a_fresh_environment_and_runs_the_pipeline(tmp_path, mobilenet_handle):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=REPO, check=True,
                   capture_output=True)
    [sdist] = list(dist.glob("*.tar.gz"))
    names = tarfile.open(sdist).getnames()
    for module in ("pipeline/run.py", "pipeline/index/__main__.py", "transforms/decode.py", "transforms/embed.py",
                   "setup.py", "requirements.txt"):
        assert any(name.endswith(module) for name in names), module

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # The heavy, already verified dependencies come from this environment; the project only from the sdist.
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(sdist)],
                   check=True, capture_output=True)

    out = tmp_path / "out"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = subprocess.run(
        [python, "-c", "import pipeline, sys; print(pipeline.__file__); from pipeline.run import main; "
                       "sys.exit(main(sys.argv[1:]))",
         "--input", f"{SAMPLES}/rocket.jp*g", "--output", str(out), "--model_handle", mobilenet_handle],
        cwd=elsewhere, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0].startswith(site)  # imported from the installed sdist, not the checkout
    assert read_embeddings(str(out)).num_rows == 1


def test_the_registry_is_plain_data_and_the_engines_share_a_contract_without_a_cycle():
    code = ("import sys, pipeline.models, transforms.litert_engine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pipeline', 'transforms')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["['pipeline',", "'pipeline.models',", "'transforms',",
                                     "'transforms.litert_engine',", "'transforms.model_contract']"]
