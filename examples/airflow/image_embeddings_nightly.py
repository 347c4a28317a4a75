"""Airflow DAG: each night, index update, then search update, then publish, each a console command.

Exit statuses decide retries: 0 done; 2 (refused before any work) and 3 (more inputs failed than
--max_error_rate) fail the task without retrying, since the same command would be refused again; 1 and 130 (failed
or interrupted: the next try resumes) are retried. Set the paths in the DAG's params, or Airflow Variables.
"""

from __future__ import annotations

import datetime
import subprocess

from airflow.exceptions import AirflowException, AirflowFailException

try:  # Airflow 3
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task

DO_NOT_RETRY = {2: "refused before any work", 3: "more inputs failed than --max_error_rate"}
PARAMS = {
    "index": "gs://BUCKET/index",
    "manifest": "gs://BUCKET/manifest.csv",
    "search": "gs://BUCKET/search",
    "publish_to": "postgresql://embeddings@db/embeddings",
    "metrics": "/var/lib/node_exporter/textfile",
}


def run_command(*args: str) -> None:
    """Runs `image-embeddings ARGS`; maps its exit status to done, fail-at-once or retry."""
    code = subprocess.run(["image-embeddings", *args]).returncode
    if code == 0:
        return
    if code in DO_NOT_RETRY:
        raise AirflowFailException(f"image-embeddings {args[0]} exited {code} ({DO_NOT_RETRY[code]}): not retried.")
    raise AirflowException(f"image-embeddings {args[0]} exited {code}: retried.")


@dag(dag_id="image_embeddings_nightly", schedule="0 2 * * *", start_date=datetime.datetime(2026, 1, 1),
     catchup=False, max_active_runs=1, params=PARAMS,
     default_args={"retries": 3, "retry_delay": datetime.timedelta(minutes=15)}, tags=["embeddings"])
def image_embeddings_nightly():
    @task
    def index_update(params=None):
        run_command("index", "update", "--index", params["index"], "--input", params["manifest"],
                    "--metrics_file", f"{params['metrics']}/image_embeddings_index_update.prom")

    @task
    def search_update(params=None):
        run_command("search", "update", "--index", params["index"], "--output", params["search"])

    @task
    def publish(params=None):
        run_command("publish", "--index", params["index"], "--to", params["publish_to"],
                    "--metrics_file", f"{params['metrics']}/image_embeddings_publish.prom")

    index_update() >> search_update() >> publish()


image_embeddings_nightly()
