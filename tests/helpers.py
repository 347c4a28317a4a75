"""Shared test helpers: real photos, image files in every format, running the pipeline, reading outputs."""

from __future__ import annotations

import contextlib
import glob
import io
import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.index.store import IndexStore
from pipeline.storage import timestamped_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "samples")
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "retina", "hubble_deep_field", "horse")


def photo(name: str) -> np.ndarray:
    """A real photo shipped with scikit-image, as uint8 RGB."""
    import skimage.data

    path = next(p for p in glob.glob(os.path.join(os.path.dirname(skimage.data.__file__), name + ".*")))
    return np.asarray(Image.open(path).convert("RGB"))


def encode(pixels_or_image, fmt: str, **save_args) -> bytes:
    image = pixels_or_image if isinstance(pixels_or_image, Image.Image) else Image.fromarray(pixels_or_image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


TILE_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "retina", "motorcycle_left", "hubble_deep_field", "horse")


def tiles(folder, count, start=0):
    """`count` distinct images: 96x96 crops of real photos at different places, as PNG files tile-NNN.png."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(start, start + count):
        image = photo(TILE_SOURCES[number % len(TILE_SOURCES)])
        top, left = (number // len(TILE_SOURCES)) * 37 % (image.shape[0] - 96), (number * 53) % (image.shape[1] - 96)
        path = folder / f"tile-{number:03d}.png"
        path.write_bytes(encode(image[top:top + 96, left:left + 96], "PNG"))
        paths.append(str(path))
    return paths


def write_manifest(path, pairs):
    path.write_text("id,uri\n" + "".join(f"{i},{u}\n" for i, u in pairs))
    return str(path)


def synthetic_metadata(dim: int) -> dict:
    """The embedding.* metadata of an index written directly by commit_run / commit_update (no model run)."""
    return {"model": "custom", "handle": "/m", "fingerprint": "sha256:x", "image_size": "64", "dim": str(dim),
            "preprocessing": "p", "precision": "float32", "weights": "w"}


def commit_run(store, seq, name, update, pairs, vectors, row_group_size=None) -> None:
    """Writes runs/NAME/embeddings-*.parquet of (id, uri) `pairs` and `vectors` with the metadata of the index's
    index.json, and commits it as log entry `seq`."""
    from transforms.sink import embeddings_schema

    os.makedirs(store.run_dir(name))
    ids, uris = zip(*pairs)
    dim = vectors.shape[1]
    metadata = {k: str(v) for k, v in store.identity().items() if k not in ("format", "index_id", "created_at")}
    table = pa.Table.from_arrays(
        [pa.array(ids), pa.array(uris), pa.array([f"sha-{u}" for u in uris]),
         pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1)), dim)],
        schema=embeddings_schema(dim, metadata))
    pq.write_table(table, os.path.join(store.run_dir(name), "embeddings-00000-of-00001.parquet"),
                   row_group_size=row_group_size)
    store.append(seq, {"kind": "run", "run": name, "update": update, "embedded": len(ids), "errors": 0})


def commit_update(store, seq, name, live, row_group_size=None) -> None:
    """Writes updates/NAME/live-*.parquet of (id, uri) `live` and commits the update as log entry `seq`."""
    from pipeline.index.plan import PAIRS_SCHEMA

    os.makedirs(store.update_dir(name))
    ids, uris = zip(*live)
    pq.write_table(pa.table({"id": ids, "uri": uris}, schema=PAIRS_SCHEMA),
                   os.path.join(store.update_dir(name), "live-00000-of-00001.parquet"), row_group_size=row_group_size)
    store.append(seq, {"kind": "update", "update": name})


def new_index(root, handle, *options) -> None:
    """`python -m pipeline.index create` in this process; asserts it succeeded."""
    from pipeline.index.__main__ import main

    assert main(["create", "--index", str(root), "--model_handle", handle, *options]) == 0


def run_pipeline(*args: str) -> int:
    """Runs `python -m pipeline.run ARGS` in this process (model checks stay cached between tests).

    On the in-memory DirectRunner unless the arguments choose a runner or mode: the workers then run in
    this process, so mocks apply and no worker process pays TensorFlow's start-up. The command's own
    default (a worker process per core) is tested through the command line.
    """
    from pipeline.run import main

    chosen = any(a.startswith(("--runner", "--direct_running_mode", "--direct_num_workers")) for a in args)
    return main([*args] if chosen else [*args, "--direct_running_mode=in_memory"])


def direct_vectors(handle, paths, size):
    """The model called directly, one image at a time, on decode_image's pixels."""
    import tensorflow_hub as hub

    from transforms.decode import PreprocessConfig, decode_image

    model = hub.load(handle)
    config = PreprocessConfig(image_size=size)
    vectors = {}
    for path in paths:
        with open(path, "rb") as f:
            pixels = decode_image(f.read(), config)
        vectors[path] = model(pixels[np.newaxis].astype(np.float32) / 255.0).numpy()[0]
    return vectors


def assert_matches_direct_calls(pipeline_vectors, direct_vectors):
    ids = sorted(direct_vectors)
    direct = np.stack([direct_vectors[i] for i in ids])
    produced = np.stack([pipeline_vectors[i] for i in ids])
    between_images = np.linalg.norm(direct[:, None] - direct[None], axis=-1)[np.triu_indices(len(ids), 1)]
    assert np.abs(produced - direct).max() < 1e-3 * between_images.min()
    nearest = np.argmin(np.linalg.norm(produced[:, None] - direct[None], axis=-1), axis=1)
    assert list(nearest) == list(range(len(ids)))  # each vector is nearest to its own direct-call vector


def read_embeddings(out_dir: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(os.path.join(out_dir, "embeddings-*.parquet")))])


def read_errors(out_dir: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(os.path.join(out_dir, "errors-*.parquet")))])


def vectors_by_id(table: pa.Table) -> dict[str, np.ndarray]:
    dim = table.schema.field("embedding").type.list_size
    matrix = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return dict(zip(table.column("id").to_pylist(), matrix))


# The documentation a user reads: the README and the pages under docs/. Tests that check what it says read all of it.
DOCUMENTS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
_CONSOLE_FORMS = {"image-embeddings publish ": "python -m pipeline.index publish ",
                  "image-embeddings standin ": "python -m pipeline.standin_models ",
                  "image-embeddings ": "python -m pipeline."}


def documented_text() -> str:
    return "\n".join(open(path, encoding="utf-8").read() for path in DOCUMENTS)


def documented_commands(substitutions: Optional[dict] = None) -> list:
    """Every command line in the documents' code blocks: continuation lines joined, comments dropped, `substitutions`
    applied, and the console form (`image-embeddings run ...`) written as the `python -m pipeline.run ...` it runs."""
    import re

    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", documented_text(), re.S | re.M):
        text = re.sub(r"\\\n\s*", " ", block)
        for old, new in (substitutions or {}).items():
            text = text.replace(old, new)
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip())
            for console, module in _CONSOLE_FORMS.items():
                if line.startswith(console):
                    line = module + line[len(console):]
                    break
            if line.startswith("python -m pipeline."):
                commands.append(line)
    return commands

_COLLECTED: dict = {}


def _collect_into(element, key):
    _COLLECTED[key].append(element)


def run_and_collect(build) -> list:
    """Runs a small in-process Beam pipeline; `build(p)` returns a PCollection whose elements are returned.

    Elements go to a module-level list by key: DoFns are pickled, so a closure over a local list
    would fill a copy.
    """
    import uuid

    import apache_beam as beam

    key = uuid.uuid4().hex
    _COLLECTED[key] = []
    with beam.Pipeline() as p:
        _ = build(p) | beam.Map(_collect_into, key)
    return _COLLECTED.pop(key)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process, timeout_s: float = 90) -> None:
    import socket
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


@contextlib.contextmanager
def portable_services(worker_python: str, log_path):
    """Beam's local job service (this environment) and an SDK worker pool run by `worker_python`, on 127.0.0.1.

    Yields (job port, worker pool port); stops both afterwards. The worker pool's environment is what an
    SDK container would hold: its bin folder comes first on PATH.
    """
    import subprocess
    import sys

    job_port, worker_port = _free_port(), _free_port()
    log = open(log_path, "w")
    services = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                          "--port", str(job_port)], stdout=log, stderr=subprocess.STDOUT,
                         env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}),
        subprocess.Popen([worker_python, "-m", "apache_beam.runners.worker.worker_pool_main",
                          "--service_port", str(worker_port)], stdout=log, stderr=subprocess.STDOUT,
                         env={**os.environ, "PATH": f"{os.path.dirname(worker_python)}:{os.environ['PATH']}"}),
    ]
    try:
        _wait_for_port(job_port, services[0])
        _wait_for_port(worker_port, services[1])
        yield job_port, worker_port
    finally:
        for service in services:
            service.terminate()
        for service in services:
            try:
                service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                service.kill()
        log.close()


def examples(default: int) -> int:
    """How many examples a generated test runs: `default` (CI), or HYPOTHESIS_EXAMPLES for a longer local run."""
    return int(os.environ.get("HYPOTHESIS_EXAMPLES", default))


# Search index tests: an index ROOT written night by night, and the plain dict it must equal.
DIM = 32  # synthetic clustered vectors: nights of thousands of changes cost milliseconds
CENTRES = np.random.default_rng(0).standard_normal((40, DIM))


def _vectors(rng, count: int) -> np.ndarray:
    return (CENTRES[rng.integers(0, len(CENTRES), count)] + 0.3 * rng.standard_normal((count, DIM))).astype(np.float32)


class Nights:
    """An index ROOT and the dict it must equal: each night embeds new and changed ids and drops removed ones."""

    def __init__(self, root: str, seed: int = 0):
        self.store, self.rng = IndexStore(root), np.random.default_rng(seed)
        self.store.create_identity(synthetic_metadata(DIM))
        self.view: dict = {}  # id -> vector: the oracle
        self.next_id = 0

    def night(self, new: int = 0, changed: int = 0, removed: int = 0) -> None:
        ids = sorted(self.view)
        picked = self.rng.permutation(len(ids))
        changing = [ids[i] for i in picked[:changed]]
        leaving = [ids[i] for i in picked[changed:changed + removed]]
        fresh = [f"img{self.next_id + i:06d}" for i in range(new)]
        self.next_id += new
        embedded = changing + fresh
        vectors = _vectors(self.rng, len(embedded))
        for id_ in leaving:
            del self.view[id_]
        self.view.update(zip(embedded, vectors))
        update, seq = timestamped_name(), len(self.store.log())
        if embedded:
            seq += 1
            commit_run(self.store, seq, update + "-run", update, [(i, f"gs://b/{i}.jpg") for i in embedded], vectors)
        live = sorted(self.view)
        commit_update(self.store, seq + 1, update, [(i, f"gs://b/{i}.jpg") for i in live])

    def exact(self, queries: np.ndarray, k: int) -> list:
        """The ids of each query's k nearest vectors of the view, by numpy."""
        ids = sorted(self.view)
        matrix = np.stack([self.view[i] for i in ids])
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ matrix.T
        return [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def search_lists(folder: str) -> list:
    """Each inverted list's rows in order (an exact index: its vectors)."""
    import faiss

    from pipeline.search.store import open_search_index

    vectors = open_search_index(folder).vectors
    if vectors.kind == "exact":
        return [vectors.index.reconstruct_n(0, vectors.rows)]
    ivf = faiss.extract_index_ivf(vectors.index)
    return [ivf.quantizer.reconstruct_n(0, ivf.nlist)] + [
        faiss.rev_swig_ptr(ivf.invlists.get_ids(n), ivf.invlists.list_size(n)).copy() for n in range(ivf.nlist)]


def search_ids_by_row(folder: str) -> list:
    """The id of every row of a search index, removed rows included, in row order."""
    from pipeline.search.store import open_search_index

    opened = open_search_index(folder)
    return opened.items.take(np.arange(opened.vectors.rows)).column("id").to_pylist()
