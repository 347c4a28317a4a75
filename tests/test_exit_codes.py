"""Exit codes tell the truth: a run whose outputs are final exits 0, every time, on a loaded machine."""

import subprocess
import sys

from helpers import REPO, SAMPLES

RUNS = 5  # in a row, each a full process with its worker processes, as a scheduler starts them


def test_many_short_runs_in_a_row_each_exit_0_after_their_summary(tmp_path, mobilenet_handle):
    codes = []
    for number in range(RUNS):
        done = subprocess.run([sys.executable, "-m", "pipeline.run", "--input", SAMPLES, "--output",
                               str(tmp_path / f"out{number}"), "--model_handle", mobilenet_handle,
                               "--progress_interval=0"], cwd=REPO, capture_output=True, text=True, timeout=300)
        codes.append(done.returncode)
        assert "terminate called" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stdout.startswith("Reading --input") and "Run report:" in done.stdout
    assert codes == [0] * RUNS
