"""The pipeline on the runners users run: DirectRunner multi-process, and the portable Job API (Flink, Dataflow v2)."""

import json
import os
import sys

import pytest

from helpers import PHOTO_NAMES, encode, photo, portable_services, read_embeddings, read_errors, run_pipeline


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for index in range(12):
        name = PHOTO_NAMES[index % len(PHOTO_NAMES)]
        (folder / f"{index:02d}-{name}.jpg").write_bytes(encode(photo(name)[index:200 + index, :300], "JPEG"))
    (folder / "broken.jpg").write_bytes(b"GIF89a-not-really")
    return folder


def _assert_complete(out, corpus):
    ids = read_embeddings(str(out)).column("id").to_pylist()
    assert sorted(ids) == sorted(str(p) for p in corpus.glob("*") if p.name != "broken.jpg")
    assert read_errors(str(out)).column("id").to_pylist() == [str(corpus / "broken.jpg")]


def test_direct_runner_multi_processing_loads_the_model_once_per_worker(tmp_path, corpus, mobilenet_handle):
    out = tmp_path / "out"
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(out), "--model_handle", mobilenet_handle,
                        "--direct_running_mode=multi_processing", "--direct_num_workers=2", "--batch_size=4") == 0
    _assert_complete(out, corpus)
    report = json.loads((out / "_run_report.json").read_text())
    assert 1 <= report["model_loads"] <= 2  # at most once per worker process, however many bundles and batches
    assert report["metrics"]["distributions"]["inference_request_batch_size"]["count"] >= 3


def test_large_model_shares_one_model_between_worker_processes(tmp_path, corpus, mobilenet_handle):
    out = tmp_path / "out"
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(out), "--model_handle", mobilenet_handle,
                        "--direct_running_mode=multi_processing", "--direct_num_workers=2", "--batch_size=4",
                        "--large_model") == 0
    _assert_complete(out, corpus)
    assert json.loads((out / "_run_report.json").read_text())["model_loads"] == 1


@pytest.fixture
def portable_job_service(tmp_path):
    """Beam's local job service plus an external SDK worker pool from this environment, on 127.0.0.1."""
    with portable_services(sys.executable, tmp_path / "services.log") as ports:
        yield ports


def test_portable_runner_with_an_external_worker_pool(tmp_path, corpus, mobilenet_handle, portable_job_service):
    job_port, worker_port = portable_job_service
    out = tmp_path / "out"
    assert run_pipeline("--input", f"{corpus}/*", "--output", str(out), "--model_handle", mobilenet_handle,
                        "--compiled_cache", str(tmp_path / "compiled"),
                        "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
                        "--environment_type=EXTERNAL", f"--environment_config=localhost:{worker_port}") == 0
    _assert_complete(out, corpus)
    assert json.loads((out / "_run_report.json").read_text())["runner"] == "PortableRunner"


def test_worker_processes_split_the_cores_between_them_unless_threads_are_set():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import parse_args
    from pipeline.run import with_thread_defaults

    def threads(*args):
        config, beam_args = parse_args(["--input", "x/*", "--output", "o", *args])
        embed = with_thread_defaults(config, PipelineOptions(beam_args)).embed
        return embed.intra_op_threads, embed.inter_op_threads

    cores = os.cpu_count()
    assert threads("--direct_running_mode=multi_processing", f"--direct_num_workers={cores}") == (1, 1)
    assert threads("--direct_running_mode=multi_processing", "--direct_num_workers=1") == (0, 0)
    assert threads("--direct_num_workers=2") == (0, 0)  # threads in one process share one TensorFlow
    assert threads("--direct_running_mode=multi_processing", "--direct_num_workers=2",
                   "--tf_intra_op_threads=3") == (3, 0)
