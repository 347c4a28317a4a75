"""One console command, `image-embeddings COMMAND ...`, installed by the package: the same commands, options and
exit statuses as `python -m pipeline.<command>`."""

import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from helpers import synthetic_metadata
from transforms.sink import embeddings_schema

SCRIPT = shutil.which("image-embeddings", path=os.path.dirname(sys.executable)) or ""


def _embeddings(folder, count=300, dim=16) -> str:
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    ids = [f"img-{i}" for i in range(count)]
    table = pa.Table.from_arrays(
        [pa.array(ids), pa.array([f"gs://b/{i}.jpg" for i in ids]), pa.array([None] * count, pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(count * dim).astype(np.float32)), dim)],
        schema=embeddings_schema(dim, synthetic_metadata(dim)))
    pq.write_table(table, os.path.join(folder, "embeddings-00000-of-00001.parquet"))
    return os.path.join(folder, "embeddings-*.parquet")


def test_the_package_installs_the_console_command():
    [entry] = importlib.metadata.entry_points(group="console_scripts", name="image-embeddings")
    assert entry.value == "pipeline.cli:console"
    assert SCRIPT, "pip install -e . put image-embeddings beside this Python"


def test_a_command_runs_as_its_python_m_form_with_the_same_output_and_exit_status(tmp_path):
    pattern = _embeddings(str(tmp_path / "emb"))
    built = subprocess.run([SCRIPT, "search", "build", "--embeddings", pattern, "--output", str(tmp_path / "s")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert "Search index of 300 vectors written to" in built.stderr
    asked = ["query", "--index", str(tmp_path / "s"), "--id", "img-7", "missing", "-k", "3"]
    console = subprocess.run([SCRIPT, "search", *asked], capture_output=True, text=True)
    module = subprocess.run([sys.executable, "-m", "pipeline.search", *asked], capture_output=True, text=True)
    assert console.returncode == module.returncode == 1  # one query could not be answered
    assert console.stdout == module.stdout and console.stdout.splitlines()[1].split()[2] == "img-7"


def test_unknown_commands_and_options_are_refused_before_any_work(tmp_path):
    typo = subprocess.run([SCRIPT, "serch"], capture_output=True, text=True)
    assert typo.returncode == 2 and "unknown command 'serch'; did you mean search?" in typo.stderr
    option = subprocess.run([SCRIPT, "run", "--inptu", "x", "--output", str(tmp_path / "o")], capture_output=True,
                            text=True)
    assert option.returncode == 2 and "did you mean --input?" in option.stderr
    assert not (tmp_path / "o").exists()
    assert subprocess.run([SCRIPT], capture_output=True).returncode == 2
    helped = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "image-embeddings publish" in helped.stdout


def test_publish_is_the_index_publish_command():
    helped = subprocess.run([SCRIPT, "publish", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--to URL" in helped.stdout


def test_ctrl_c_while_a_command_still_imports_says_one_line():
    started = subprocess.Popen([SCRIPT, "run", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # the window: Beam and TensorFlow are being imported (seconds)
    started.send_signal(signal.SIGINT)
    out, err = started.communicate(timeout=60)
    assert started.returncode == 130, (out, err)
    assert err.strip() == "Interrupted while starting: nothing was read or written."
