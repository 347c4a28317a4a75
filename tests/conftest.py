"""Session fixtures: stand-in SavedModels (built once, cached on disk across sessions) and image corpora."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from helpers import REPO, SAMPLES
from pipeline.flink.dist import DEFAULT_CACHE as FLINK_RECIPE_CACHE

# The generated tests run the same examples on every run (CI included), so a failure reproduces; for a longer,
# random exploration locally: HYPOTHESIS_RANDOM=1 HYPOTHESIS_EXAMPLES=200 ./run_tests.sh -k ...
settings.register_profile("project", derandomize=not os.environ.get("HYPOTHESIS_RANDOM"), database=None,
                          deadline=None, print_blob=True)
settings.load_profile("project")

STANDIN_CACHE = os.environ.get("STANDIN_CACHE_DIR", os.path.join(REPO, ".cache", "standins"))
FLINK_CACHE = FLINK_RECIPE_CACHE  # the recipe's (python -m pipeline.flink): Flink fetched and built once for both


def _standin(name: str) -> str:
    """Built once; under pytest-xdist (-n) the first worker builds it while the others wait on the lock."""
    import fcntl

    from pipeline.models import MODELS
    from pipeline.standin_models import cached_standin, load_calibration_images

    spec = MODELS[name]
    os.makedirs(STANDIN_CACHE, exist_ok=True)
    with open(os.path.join(STANDIN_CACHE, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return cached_standin(spec, STANDIN_CACHE, load_calibration_images(os.path.join(SAMPLES, "*"), spec))


@pytest.fixture(scope="session")
def mobilenet_handle() -> str:
    return _standin("mobilenet_v2_130_224")


@pytest.fixture(scope="session")
def inception_handle() -> str:
    return _standin("inception_resnet_v2")


@pytest.fixture(scope="session")
def fake_gcs():
    """One fake-gcs-server (behind the batch and fault adapter) for the session; each test uses its own prefix."""
    from gcs_emulator import FakeGcs

    emulator = FakeGcs()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def flink(tmp_path_factory):
    """A real Flink cluster for the session: a JobManager, two TaskManagers (JVMs) and an SDK worker pool.

    The first session downloads Flink from PyPI and builds Beam's job server with Maven (about 2 minutes, cached).
    """
    from pipeline.flink.cluster import LocalFlink

    with LocalFlink(str(tmp_path_factory.mktemp("flink")), taskmanagers=2, slots=2, cache=FLINK_CACHE) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A private PostgreSQL 16 with pgvector for the session (PyPI's pgserver; a Unix socket, no TCP port): its URL."""
    import warnings

    with warnings.catch_warnings():  # platformdirs: no XDG_RUNTIME_DIR on CI machines, /tmp is used (fine here)
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(str(tmp_path_factory.mktemp("postgres")), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture
def gcs(fake_gcs, monkeypatch):
    """The emulator as gs:// for this process, faults cleared before and after."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    # Anonymous at once: Beam would first spend about 25 s retrying to find Google credentials on this machine.
    monkeypatch.setattr("apache_beam.internal.gcp.auth._Credentials.get_service_credentials",
                        classmethod(lambda cls, options: None))
    fake_gcs.clear()
    yield fake_gcs
    fake_gcs.clear()


@pytest.fixture(params=["local", "gs"])
def index_root(request, tmp_path) -> str:
    """An index root that does not exist yet: a local folder, or a fresh prefix on the emulated gs://."""
    if request.param == "local":
        return str(tmp_path / "index")
    import uuid

    emulator = request.getfixturevalue("gcs")
    return f"gs://{emulator.bucket}/{uuid.uuid4().hex[:8]}/index"


def pytest_configure(config):
    """A suite started in the background (`cmd &`: SIGINT ignored, inherited by every process it starts) still
    gives its processes a terminal's Ctrl-C, which the Ctrl-C tests send: a handled signal is default after exec."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config):
    """Beam's exit handler for the FlinkRunner's job servers (already stopped by the runs) logs after pytest has
    closed the captured streams: not an error worth a traceback at the end of every session."""
    import logging

    logging.raiseExceptions = False


# The quick loop (`./run_tests.sh -m "not slow"`) leaves out what starts clusters, servers or worker pools, the
# large Inception stand-in, the kill and crash loops, and the tests that run many pipelines (each over 15 s,
# measured); CI runs everything.
SLOW_FIXTURES = {"flink", "postgres", "fake_gcs", "inception_handle", "airflow_python"}
SLOW_NAMES = ("kill", "crash", "ctrl_c", "at_scale", "test_search_distributed.py", "test_row_boundary.py",
              "budget_that_binds", "many_short_runs", "run_local_script", "bfloat16", "later_job_starts",
              "three_nights", "listing_that_fails", "uris_all_fail")


# Under pytest-xdist (run_tests.sh: --dist loadgroup), the tests of one session-wide server or cluster run on one
# worker, so that each is started once, as in a serial run.
XDIST_GROUPS = {"flink": "flink", "postgres": "postgres", "fake_gcs": "gcs", "gcs": "gcs", "airflow_python": "airflow"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_gcs = params.get("index_root") == "gs" or params.get("where") == "gs"
        if (SLOW_FIXTURES & set(item.fixturenames) or any(word in item.nodeid for word in SLOW_NAMES)
                or on_gcs):
            item.add_marker(pytest.mark.slow)
        groups = {group for fixture, group in XDIST_GROUPS.items() if fixture in item.fixturenames}
        if on_gcs:
            groups.add("gcs")
        if groups:
            item.add_marker(pytest.mark.xdist_group(sorted(groups)[0]))
