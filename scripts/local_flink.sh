#!/usr/bin/env bash
# A Flink cluster on this machine (JobManager, 2 TaskManagers, an SDK worker pool), for trying the FlinkRunner path.
# Needs Java 17 and Maven (the first start downloads Flink from PyPI and builds Beam's job server: about 2 minutes).
# Prints the Beam options to pass to `python -m pipeline.run`; Ctrl-C stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh
exec python -m pipeline.flink up "$@"
