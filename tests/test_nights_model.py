"""Model-based test of the index and its serving tables: seeded random sequences of nights (new ids, changed
uris, removed ids, uris that fail), updates and publishes stopped at named crash points, and after every step
the index's snapshot and each table equal a reference kept as a plain dict. More sequences:
HYPOTHESIS_EXAMPLES=N (and NIGHTS=M per sequence).

The reference is the README's rules, written here without the index's code: the view is every input id whose
uri embeds; an update is refused (and changes nothing) when it would remove more than half of the live ids
from the input, or take more than half of the view's ids out of it; a crashed update or publish changes
nothing that counts, and the next one completes. Vectors come from a thumbnail model (tests/thumbnail_model.py)
and are compared with thumbnails computed here with numpy from the image files.
"""

from __future__ import annotations

import collections
import itertools
import os
import pathlib
import random
import tempfile
import uuid

import lancedb
import numpy as np
import psycopg
import pytest

from helpers import examples, read_embeddings, tiles, vectors_by_id, write_manifest
from pipeline.index.__main__ import main as index_main
from thumbnail_model import build_thumbnail_model
from transforms import crashpoints

SIZE, GRID = 64, 8
UPDATE_POINTS = ("update.begun", "update.run_written", "update.run_committed", "update.before_commit")
PUBLISH_POINTS = {"lancedb": ("publish.lancedb.pending", "publish.lancedb.upserted", "publish.lancedb.deleted"),
                  "postgres": ("publish.postgres.copied",)}
HITS: collections.Counter = collections.Counter()  # crash points reached, over every sequence


class SimulatedCrash(BaseException):
    """Raised at an armed crash point: like a kill, nothing but `finally` blocks runs after it."""


def thumbnail(path: str) -> np.ndarray:
    """What the thumbnail model returns for an image file, computed directly."""
    from transforms.decode import PreprocessConfig, decode_image

    with open(path, "rb") as f:
        pixels = decode_image(f.read(), PreprocessConfig(image_size=SIZE)).astype(np.float32) / 255.0
    cell = SIZE // GRID
    small = pixels.reshape(GRID, cell, GRID, cell, 3).mean(axis=(1, 3)).reshape(-1)
    return small - small.mean()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nights-model")
    images = tiles(folder / "images", 16)
    corrupt = folder / "images" / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    return {"folder": str(folder), "handle": build_thumbnail_model(str(folder / "model"), SIZE, GRID),
            "good": images, "failing": [str(corrupt), str(folder / "missing" / "gone.png")],
            "thumbnails": {path: thumbnail(path) for path in images}}


def index(*args) -> int:
    return index_main(list(args))


class NightsAndPublishes:
    """One sequence of nights drawn from `rng`: each night changes the input, updates (stopped at the next crash
    point of the turn, then run again when it was), and publishes to both targets (a stopped publish is run
    again at once or only after the next night, so that half-published views pile up). Where steps stop
    turns through every crash point, shared by all sequences, so that each is hit (checked at the end)."""

    turns = {"update": itertools.cycle(sum(((None, point) for point in UPDATE_POINTS), ())),
             **{target: itertools.cycle(sum(((None, point) for point in points), ()))
                for target, points in PUBLISH_POINTS.items()}}
    aimed: dict = {}  # kind -> the crash point its next step stops at (kept until a step reaches it)

    @classmethod
    def next_stop(cls, kind: str):
        if kind not in cls.aimed:
            cls.aimed[kind] = next(cls.turns[kind])
        return cls.aimed[kind]

    @classmethod
    def stepped(cls, kind: str, stopped: bool) -> None:
        if stopped or cls.aimed.get(kind) is None:
            cls.aimed.pop(kind, None)

    def __init__(self, world: dict, postgres: str, rng: random.Random):
        self.world, self.postgres, self.rng = world, postgres, rng
        self.folder = tempfile.mkdtemp(dir=world["folder"])
        self.root = os.path.join(self.folder, "index")
        self.input: dict = {}  # the night's manifest
        self.live: dict = {}  # the input of the last committed update
        self.view: dict = {}  # id -> uri of the current view
        self.published: dict = {}  # target -> the view its last complete publish wrote, absent when unknown
        self.targets = {"lancedb": os.path.join(self.folder, "lancedb"), "postgres": postgres}
        self.table = "t_" + uuid.uuid4().hex[:8]
        self.nights, self.next_id, self.trace = 0, 0, []
        assert index("create", "--index", self.root, "--model", "custom", "--model_handle", world["handle"],
                     "--image_size", str(SIZE), "--embedding_dim", str(GRID * GRID * 3)) == 0

    def run(self, nights: int) -> list:
        for _ in range(nights):
            self.night()
            while self.update(self.next_stop("update")):
                pass  # stopped: the next update starts from what it left
            for target in sorted(self.targets):
                while self.publish(target, self.next_stop(target)) and self.rng.random() < 0.5:
                    pass  # run again at once, or leave the table half-published until after the next night
        for target in sorted(self.targets):
            self.publish(target, None)
        return self.trace

    def night(self):
        """Removes, changes and adds ids; a uri may fail (not an image, or missing)."""
        rng, good, failing = self.rng, self.world["good"], self.world["failing"]

        def uri():
            return rng.choice(failing) if rng.random() < 0.25 else rng.choice(good)

        for id_ in rng.sample(sorted(self.input), max(0, min(len(self.input) - 1, rng.randint(0, 2)))):
            del self.input[id_]
        for id_ in rng.sample(sorted(self.input), min(len(self.input), rng.randint(0, 3))):
            self.input[id_] = uri()
        for _ in range(4 if not self.input else rng.randint(0, 3)):
            self.next_id += 1
            self.input[f"id{self.next_id}"] = uri()

    def publish(self, target, point) -> bool:
        """Publishes; True when it stopped at `point`."""
        unchanged = self.published.get(target) == self.view
        version = self._lance().version if target == "lancedb" and unchanged else None
        stopped = self._stopped_at(point, lambda: self._run_publish(target))
        self.stepped(target, stopped)
        self.trace.append(f"publish {target}" + (f" stopped at {point}" if stopped else ""))
        if stopped:
            self.published.pop(target, None)  # a half-applied mix of views, until a publish completes
            return True
        self._check_rows(*self._rows(target))
        if version is not None:
            assert self._lance().version == version, "a publish of an unchanged view wrote a new version"
        self.published[target] = dict(self.view)
        return False

    # --- the reference ----------------------------------------------------------------------------------------

    def update(self, point) -> bool:
        """Updates from the night's input; True when it stopped at `point`. The reference decides the outcome."""
        self.nights += 1
        manifest = write_manifest(pathlib.Path(self._path(f"night{self.nights}.csv")), sorted(self.input.items()))
        good = set(self.world["good"])
        candidate = {i: u for i, u in self.input.items() if u in good}
        removed = len(set(self.live) - set(self.input))
        lost = len(set(self.view) - set(candidate))
        refused = (removed and removed > 0.5 * len(self.live)) or (lost and lost > 0.5 * len(self.view))
        stopped = self._stopped_at(point, lambda: self._run_update(manifest, 2 if refused else 0))
        self.stepped("update", stopped)
        self.trace.append(f"update of {len(self.input)} ids" + (f" stopped at {point}" if stopped else
                                                                 " refused" if refused else ""))
        if not stopped and not refused:
            self.view, self.live = candidate, dict(self.input)
        if refused and not stopped:
            self.input = dict(self.live)  # the operator fixes the manifest
        out = self._path(f"snapshot{self.nights}")
        assert index("snapshot", "--index", self.root, "--output", out) == 0
        snapshot = read_embeddings(out)
        self._check_rows(vectors_by_id(snapshot), dict(zip(*(snapshot.column(c).to_pylist() for c in ("id", "uri")))))
        return stopped

    def _run_publish(self, target):
        assert index("publish", "--index", self.root, "--to", self.targets[target], "--table", self.table) == 0

    def _run_update(self, manifest, expected_code):
        code = index("update", "--index", self.root, "--input", manifest, "--run_size", "2",
                     "--direct_running_mode=in_memory", "--progress_interval=0")
        assert code == expected_code

    @staticmethod
    def _stopped_at(point, step) -> bool:
        """Runs `step` with `point` armed; True when it stopped there."""
        if point is None:
            step()
            return False

        def crash():
            HITS[point] += 1
            raise SimulatedCrash(point)

        crashpoints.arm(point, crash)
        try:
            step()
        except SimulatedCrash:
            return True
        finally:
            crashpoints.disarm_all()
        return False  # the night gave the point nothing to stop at (no run to commit, nothing to write)

    # --- what the targets hold ----------------------------------------------------------------------------------

    def _lance(self):
        return lancedb.connect(self.targets["lancedb"]).open_table(self.table)

    def _rows(self, target) -> tuple:
        """({id: vector}, {id: uri}) of what `target` holds."""
        if target == "lancedb":
            data = self._lance().to_arrow()
            ids = data.column("id").to_pylist()
            assert len(ids) == len(set(ids)), "an id twice"
            return vectors_by_id(data), dict(zip(ids, data.column("uri").to_pylist()))
        with psycopg.connect(self.postgres) as conn:
            found = conn.execute(f"SELECT id, uri, embedding::real[] FROM {self.table}").fetchall()
        return {i: np.array(v, np.float32) for i, _, v in found}, {i: u for i, u, _ in found}

    def _check_rows(self, vectors, uris):
        assert uris == self.view
        for id_, uri in self.view.items():
            np.testing.assert_allclose(vectors[id_], self.world["thumbnails"][uri], atol=1e-5)

    def _path(self, name):
        return os.path.join(self.folder, name)


def test_random_nights_updates_and_publishes_with_crashes_always_end_equal_to_the_reference(world, postgres):
    sequences = examples(2)
    for seed in range(sequences):
        trace = NightsAndPublishes(world, postgres, random.Random(seed)).run(int(os.environ.get("NIGHTS", 5)))
        print(f"sequence {seed}: " + "; ".join(trace))
    print(f"{sequences} sequences; crash points hit: {dict(HITS)}")
    for point in (*UPDATE_POINTS, *PUBLISH_POINTS["lancedb"], *PUBLISH_POINTS["postgres"]):
        assert HITS[point], f"no step stopped at {point}"
