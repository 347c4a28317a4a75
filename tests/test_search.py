"""python -m pipeline.search: build, query by image and id, near-duplicates, contact sheets.

Similarity here is tested with a thumbnail model (tests/thumbnail_model.py), whose vectors reflect what an
image looks like; the random-weight stand-ins only check that another model is refused.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import PHOTO_NAMES, encode, photo, run_pipeline
from pipeline.search.__main__ import main as search
from pipeline.search.contact_sheet import THUMB, draw_contact_sheet, tile_box
from pipeline.search.store import open_search_index
from thumbnail_model import build_thumbnail_model
from transforms.sink import embeddings_schema
from transforms.uri_reader import ReadConfig

SIZE, GRID = 64, 8
DIM = GRID * GRID * 3
PLANTED = {"copy-reencoded.jpg": "astronaut-a.jpg", "copy-resized.jpg": "coffee-b.jpg",
           "copy-identical.jpg": "rocket-a.jpg"}


def _tiles() -> dict:
    """Two quarters of each real photo: 16 images that look different from each other."""
    tiles = {}
    for name in PHOTO_NAMES:
        pixels = photo(name)
        h, w = pixels.shape[:2]
        tiles[f"{name}-a.jpg"] = pixels[: h // 2, : w // 2]
        tiles[f"{name}-b.jpg"] = pixels[h // 2:, w // 2:]
    return tiles


def _resized_copy(pixels: np.ndarray, scale: float = 0.6) -> bytes:
    image = Image.fromarray(pixels)
    return encode(image.resize((int(image.width * scale), int(image.height * scale))), "JPEG", quality=85)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 16 distinct photos plus 3 planted copies, embedded with the thumbnail model and indexed."""
    root = tmp_path_factory.mktemp("search")
    handle = build_thumbnail_model(str(root / "thumbnail-model"), SIZE, GRID)
    images = root / "images"
    images.mkdir()
    tiles = _tiles()
    for name, pixels in tiles.items():
        (images / name).write_bytes(encode(pixels, "JPEG", quality=95))
    (images / "copy-reencoded.jpg").write_bytes(encode(tiles["astronaut-a.jpg"], "JPEG", quality=60))
    (images / "copy-resized.jpg").write_bytes(_resized_copy(tiles["coffee-b.jpg"]))
    shutil.copy(images / "rocket-a.jpg", images / "copy-identical.jpg")
    out = str(root / "run")
    assert run_pipeline("--input", str(images), "--output", out, "--model", "custom", "--model_handle", handle,
                        "--image_size", str(SIZE), "--embedding_dim", str(DIM)) == 0
    index = str(root / "search-index")
    assert search(["build", "--embeddings", os.path.join(out, "embeddings-*.parquet"), "--output", index]) == 0
    return {"root": root, "images": images, "handle": handle, "run": out, "index": index, "tiles": tiles}


def _path(corpus, name: str) -> str:
    return str(corpus["images"] / name)


def test_build_writes_a_manifest_with_model_metric_and_index(corpus):
    with open(os.path.join(corpus["index"], "search.json")) as f:
        manifest = json.load(f)
    assert manifest["count"] == 19 and manifest["dim"] == DIM
    assert manifest["model"]["fingerprint"].startswith("sha256:") and manifest["model"]["model"] == "custom"
    assert manifest["metric"].startswith("cosine") and "L2-normalised" in manifest["vectors"]
    assert manifest["index"]["kind"] == "exact" and manifest["index"]["library"].startswith("faiss")
    assert manifest["with_sha256"] == 19


def test_a_reencoded_resized_copy_finds_its_original_first(corpus, tmp_path):
    query = tmp_path / "holiday.jpg"
    query.write_bytes(_resized_copy(corpus["tiles"]["chelsea-b.jpg"], scale=0.5))
    out = str(tmp_path / "hits.parquet")
    assert search(["query", "--index", corpus["index"], "--image", str(query), "-k", "3", "--output", out]) == 0
    hits = pq.read_table(out).to_pylist()
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["id"] == _path(corpus, "chelsea-b.jpg") and hits[0]["query"] == str(query)
    assert hits[0]["similarity"] > 0.99 > hits[1]["similarity"]


def test_query_by_id_puts_the_id_itself_first_even_with_an_identical_copy(corpus, tmp_path):
    out = str(tmp_path / "hits.json")
    asked = [_path(corpus, "rocket-a.jpg"), _path(corpus, "copy-identical.jpg")]
    assert search(["query", "--index", corpus["index"], "--id", *asked, "-k", "2", "--output", out]) == 0
    with open(out) as f:
        hits = json.load(f)
    assert [(h["query"], h["rank"], h["id"]) for h in hits] == [
        (asked[0], 1, asked[0]), (asked[0], 2, asked[1]), (asked[1], 1, asked[1]), (asked[1], 2, asked[0])]
    assert all(h["similarity"] == pytest.approx(1.0, abs=1e-5) for h in hits)


def test_unknown_ids_and_unreadable_images_are_named_and_the_rest_answered(corpus, tmp_path, capsys):
    assert search(["query", "--index", corpus["index"], "--id", "nope", _path(corpus, "horse-a.jpg")]) == 1
    err = capsys.readouterr().err
    assert "Not queried: nope: id 'nope' is not in the index" in err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert search(["query", "--index", corpus["index"], "--image", str(broken), str(tmp_path / "missing.jpg"),
                   _path(corpus, "horse-b.jpg")]) == 1
    captured = capsys.readouterr()
    assert f"Not queried: {broken}: Not a supported image" in captured.err
    assert f"Not queried: {tmp_path / 'missing.jpg'}" in captured.err
    assert f"query {_path(corpus, 'horse-b.jpg')}\n    1  1.0000  {_path(corpus, 'horse-b.jpg')}" in captured.out


def test_another_model_is_refused_for_image_queries(corpus, mobilenet_handle, capsys):
    code = search(["query", "--index", corpus["index"], "--image", _path(corpus, "horse-a.jpg"),
                   "--model_handle", mobilenet_handle])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not the one this index was built with" in err and "not comparable" in err


def test_a_copy_of_the_model_elsewhere_is_accepted(corpus, tmp_path):
    mirror = str(tmp_path / "mirror")
    shutil.copytree(corpus["handle"], mirror)
    assert search(["query", "--index", corpus["index"], "--image", _path(corpus, "horse-a.jpg"), "-k", "1",
                   "--model_handle", mirror]) == 0


def test_embeddings_of_two_models_are_refused(corpus, tmp_path, capsys):
    other = build_thumbnail_model(str(tmp_path / "other-model"), SIZE, GRID // 2)
    runs = tmp_path / "runs"
    shutil.copytree(corpus["run"], runs / "a")
    assert run_pipeline("--input", _path(corpus, "horse-a.jpg"), "--output", str(runs / "b"), "--model", "custom",
                        "--model_handle", other, "--image_size", str(SIZE),
                        "--embedding_dim", str(3 * (GRID // 2) ** 2)) == 0
    code = search(["build", "--embeddings", str(runs / "*" / "embeddings-*.parquet"), "--output",
                   str(tmp_path / "idx")])
    assert code == 2
    err = capsys.readouterr().err
    assert "different models" in err and "fingerprint" in err and not os.path.exists(tmp_path / "idx" / "search.json")


def test_overlapping_runs_are_refused_with_what_to_build_from(corpus, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(corpus["run"], runs / "a")
    shutil.copytree(corpus["run"], runs / "b")
    assert search(["build", "--embeddings", str(runs / "*" / "embeddings-*.parquet"), "--output",
                   str(tmp_path / "idx")]) == 2
    assert "appears more than once" in capsys.readouterr().err


def test_duplicates_finds_exactly_the_planted_groups(corpus, tmp_path, capsys):
    out = str(tmp_path / "dups.parquet")
    assert search(["duplicates", "--index", corpus["index"], "--output", out]) == 0
    assert "3 groups of near-duplicates (6 images; 1 of them byte-identical copies)" in capsys.readouterr().err
    rows = pq.read_table(out).to_pylist()
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    found = sorted(sorted(os.path.basename(r["id"]) for r in members) for members in groups.values())
    assert found == sorted(sorted([copy, original]) for copy, original in PLANTED.items())
    for members in groups.values():
        assert members[0]["similarity"] == pytest.approx(1.0, abs=1e-5) and members[1]["similarity"] > 0.99
        identical = "copy-identical.jpg" in {os.path.basename(m["id"]) for m in members}
        assert [m["same_bytes"] for m in members] == [False, identical]
    assert sum(row["same_bytes"] for row in rows) == 1  # filtering on it counts the byte-identical copies


def test_contact_sheets_scale_16_bit_images_keep_name_ends_wrap_long_rows_and_carry_the_warning(tmp_path):
    from PIL import Image, ImageDraw, ImageFont

    from pipeline.search.contact_sheet import MAX_COLUMNS, Tile, _fit, _thumbnail

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((40, 60), 30000, np.uint16)).save(deep)  # mid-grey in 16 bits
    assert abs(np.asarray(_thumbnail(str(deep), ReadConfig())).mean() - 30000 * 255 / 65535) < 2
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = _fit(draw, "/data/archive/2026/photos/holiday-00123.jpg", ImageFont.load_default(), THUMB)
    assert label.startswith("...") and label.endswith("holiday-00123.jpg")
    row = [Tile(str(deep), (f"member {n}", "1.0000")) for n in range(2 * MAX_COLUMNS + 6)]
    plain, warned = tmp_path / "plain.png", tmp_path / "warned.png"
    draw_contact_sheet([row], str(plain))
    draw_contact_sheet([row], str(warned), warning="random-weight stand-in model: NOT meaningful")
    with Image.open(plain) as sheet:
        assert sheet.size == (tile_box(0, MAX_COLUMNS)[0], tile_box(3, 0)[1])  # 26 tiles: three lines of 10
    with Image.open(warned) as sheet:
        band = np.asarray(sheet.convert("RGB"))[tile_box(3, 0)[1]:]
    assert band.shape[0] > 0 and ((band[..., 0] > 150) & (band[..., 1] < 80)).any()  # red text under the tiles


def test_threshold_sets_how_alike_duplicates_must_be(corpus, tmp_path):
    loose, strict = str(tmp_path / "loose.parquet"), str(tmp_path / "strict.parquet")
    assert search(["duplicates", "--index", corpus["index"], "--output", loose, "--threshold", "0.5"]) == 0
    assert search(["duplicates", "--index", corpus["index"], "--output", strict, "--threshold", "1.0"]) == 0
    assert pq.read_table(loose).num_rows > 6
    strict_rows = pq.read_table(strict).to_pylist()  # only the same bytes are that alike for sure
    assert sorted(os.path.basename(r["id"]) for r in strict_rows) == ["copy-identical.jpg", "rocket-a.jpg"]


def _cell(sheet: np.ndarray, row: int, column: int) -> np.ndarray:
    left, top, right, bottom = tile_box(row, column)
    return sheet[top:bottom, left:right].astype(np.float32)


def _thumbnail(path: str) -> np.ndarray:
    """The image fitted into the tile and centred on white, drawn independently of the sheet's code."""
    canvas = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMB, THUMB))
        canvas.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
    return np.asarray(canvas, np.float32)


def _drawn(cell: np.ndarray, candidates: dict) -> str:
    """Which candidate image a sheet cell shows: the one whose thumbnail is closest in pixels."""
    return min(candidates, key=lambda name: np.abs(cell - candidates[name]).mean())


def _canonical(path: str) -> str:
    """A planted copy and its original look alike in a thumbnail: both count as the original."""
    return PLANTED.get(os.path.basename(path), os.path.basename(path))


def test_contact_sheet_has_a_row_per_query_with_the_hits_in_order(corpus, tmp_path):
    sheet_path, out = str(tmp_path / "hits.png"), str(tmp_path / "hits.parquet")
    queries = [_path(corpus, "retina-a.jpg"), _path(corpus, "horse-b.jpg")]
    assert search(["query", "--index", corpus["index"], "--image", *queries, "-k", "3", "--output", out,
                   "--contact_sheet", sheet_path]) == 0
    with Image.open(sheet_path) as image:
        assert image.format == "PNG"
        sheet = np.asarray(image.convert("RGB"))
    assert sheet.shape[0] == tile_box(2, 0)[1] and sheet.shape[1] == tile_box(0, 4)[0]  # 2 rows: query + 3 hits
    candidates = {str(p): _thumbnail(str(p)) for p in corpus["images"].iterdir()}
    hits = pq.read_table(out).to_pylist()
    for row, query in enumerate(queries):
        expected = [query] + [h["id"] for h in hits if h["query"] == query]
        cells = [_cell(sheet, row, column) for column in range(4)]
        assert [_canonical(_drawn(c, candidates)) for c in cells] == [_canonical(e) for e in expected]
        assert all(np.abs(c - candidates[e]).mean() < 8 for c, e in zip(cells, expected))


def test_duplicates_contact_sheet_draws_each_group_as_a_row(corpus, tmp_path):
    sheet_path = str(tmp_path / "dups.png")
    assert search(["duplicates", "--index", corpus["index"], "--output", str(tmp_path / "d.parquet"),
                   "--contact_sheet", sheet_path]) == 0
    with Image.open(sheet_path) as image:
        sheet = np.asarray(image.convert("RGB"))
    assert sheet.shape[0] == tile_box(3, 0)[1]
    groups = pq.read_table(str(tmp_path / "d.parquet")).to_pylist()
    firsts = [r["id"] for r in groups if r["similarity"] > 0.99999 and not r["id"].endswith(tuple(PLANTED))]
    candidates = {str(p): _thumbnail(str(p)) for p in corpus["images"].iterdir() if p.name not in PLANTED}
    assert [_drawn(_cell(sheet, row, 0), candidates) for row in range(3)] == sorted(firsts)


def _synthetic_run(folder: str, count: int, dim: int = 32, weights: str = "w") -> np.ndarray:
    """An embeddings file of clustered vectors, as a run of some model would write it."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, dim))
    vectors = (centres[rng.integers(0, 50, count)] + 0.3 * rng.standard_normal((count, dim))).astype(np.float32)
    metadata = {"model": "custom", "handle": "/models/x", "fingerprint": "sha256:x", "image_size": "64",
                "dim": str(dim), "preprocessing": "p", "precision": "float32", "weights": weights}
    ids = [f"img{i:05d}" for i in range(count)]
    table = pa.Table.from_arrays([pa.array(ids), pa.array([f"gs://b/{i}.jpg" for i in ids]),
                                  pa.array([None] * count, pa.string()),
                                  pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)],
                                 schema=embeddings_schema(dim, metadata))
    os.makedirs(folder)
    pq.write_table(table, os.path.join(folder, "embeddings-00000-of-00001.parquet"))
    return vectors


def test_approximate_index_is_tuned_for_recall_and_agrees_with_exact_search(tmp_path):
    vectors = _synthetic_run(str(tmp_path / "run"), 6000)
    files = str(tmp_path / "run" / "embeddings-*.parquet")
    for kind in ("ann", "exact"):
        assert search(["build", "--embeddings", files, "--output", str(tmp_path / kind), "--kind", kind]) == 0
    with open(tmp_path / "ann" / "search.json") as f:
        index = json.load(f)["index"]
    assert index["kind"] == "ann" and index["tuned_recall_at_10"] >= 0.97 and index["nprobe"] < index["lists"]
    assert index["held_out_queries"] == 400 and 0.9 <= index["held_out_recall_at_10"] <= 1
    pairs = {}
    for kind in ("ann", "exact"):  # near-duplicate pairs: every one, on both kinds
        opened = open_search_index(str(tmp_path / kind))
        pairs[kind] = {(int(a), int(b)): float(s) for rows, others, similarities in opened.vectors.pairs_above(0.9)
                       for a, b, s in zip(rows, others, similarities)}
    differing = set(pairs["ann"]) ^ set(pairs["exact"])
    assert len(pairs["exact"]) > 1000 and all(abs({**pairs["ann"], **pairs["exact"]}[p] - 0.9) < 1e-5
                                              for p in differing)  # only float rounding at the threshold
    asked = [f"img{i:05d}" for i in range(0, 6000, 60)]
    found = {}
    for kind in ("ann", "exact"):
        out = str(tmp_path / f"{kind}.parquet")
        assert search(["query", "--index", str(tmp_path / kind), "--id", *asked, "-k", "10", "--output", out]) == 0
        hits = pq.read_table(out).to_pylist()
        assert all(h["id"] == h["query"] for h in hits if h["rank"] == 1)
        found[kind] = {(h["query"], h["id"]) for h in hits}
    assert len(found["ann"] & found["exact"]) / len(found["exact"]) >= 0.95
    normalised = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    best = pq.read_table(str(tmp_path / "exact.parquet")).to_pylist()[1]
    assert best["similarity"] == pytest.approx(float(normalised[0] @ normalised[int(best["id"][3:])]), abs=1e-5)


def _recall(found: list, truth: list) -> float:
    return len(set(found) & set(truth)) / len(truth)


def test_compressed_index_holds_codes_reranks_from_disk_and_finds_what_exact_search_finds(tmp_path):
    vectors = _synthetic_run(str(tmp_path / "run"), 6000, dim=64)
    files = str(tmp_path / "run" / "embeddings-*.parquet")
    for kind in ("compressed", "exact"):
        assert search(["build", "--embeddings", files, "--output", str(tmp_path / kind), "--kind", kind]) == 0
    manifest = json.loads((tmp_path / "compressed" / "search.json").read_text())
    index = manifest["index"]
    assert index["kind"] == "compressed" and index["code_bytes"] == 32 and index["tuned_recall_at_10"] >= 0.97
    assert index["memory_bytes"] < 6000 * 64 * 4 / 4  # codes, not floats
    normalised = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    stored = np.fromfile(tmp_path / "compressed" / manifest["files"]["exact_vectors"][0], np.float32).reshape(-1, 64)
    np.testing.assert_allclose(stored, normalised, atol=1e-6)  # the exact vectors, row for row
    asked = [f"img{i:05d}" for i in range(0, 6000, 60)]
    hits = {}
    for kind in ("compressed", "exact"):
        out = str(tmp_path / f"{kind}.parquet")
        assert search(["query", "--index", str(tmp_path / kind), "--id", *asked, "-k", "10", "--output", out]) == 0
        hits[kind] = pq.read_table(out).to_pylist()
    assert _recall([(h["query"], h["id"]) for h in hits["compressed"]],
                   [(h["query"], h["id"]) for h in hits["exact"]]) >= 0.95
    for hit in hits["compressed"]:  # similarities are exact (re-ranked), not the codes' estimates
        expected = float(normalised[int(hit["query"][3:])] @ normalised[int(hit["id"][3:])])
        assert hit["similarity"] == pytest.approx(expected, abs=1e-5)
    pairs = {}
    for kind in ("compressed", "exact"):
        opened = open_search_index(str(tmp_path / kind))
        pairs[kind] = {(int(a), int(b)) for rows, others, _ in opened.vectors.pairs_above(0.95)
                       for a, b in zip(rows, others)}
    assert len(pairs["exact"]) > 1000
    assert pairs["compressed"] <= pairs["exact"] and len(pairs["compressed"]) / len(pairs["exact"]) >= 0.95


def test_max_memory_picks_the_kind_that_fits_a_corpus():
    from pipeline.search.vector_index import choose_layout

    assert choose_layout("auto", 50_000, 1664, None).kind == "exact"
    assert choose_layout("auto", 2_000_000, 1664, None).kind == "ann"  # no budget: full vectors
    budget = 4 * 2**30
    layout = choose_layout("auto", 2_000_000, 1664, budget)  # 13 GB of floats do not fit in 4 GB
    assert (layout.kind, layout.code_bytes) == ("compressed", 832) and layout.build_memory <= budget
    smaller = choose_layout("compressed", 20_000_000, 1664, budget)  # fewer bytes a vector, to fit
    assert smaller.code_bytes == 104 and smaller.build_memory <= budget


def test_max_memory_shrinks_the_codes_and_refuses_what_cannot_fit_before_any_work(tmp_path, capsys):
    from pipeline.search.vector_index import Layout, human, list_count

    _synthetic_run(str(tmp_path / "run"), 6000, dim=64)
    files = str(tmp_path / "run" / "embeddings-*.parquet")
    from pipeline.search.collection import from_files

    read = from_files(files).row_group_bytes  # the reader holds a whole row group: the estimate counts it
    short = Layout("compressed", 6000, 64, code_bytes=32, row_group_bytes=read).build_memory - 1  # a byte short
    assert search(["build", "--embeddings", files, "--output", str(tmp_path / "tight"), "--kind", "compressed",
                   "--max_memory", str(short)]) == 0
    index = json.loads((tmp_path / "tight" / "search.json").read_text())["index"]
    assert index["kind"] == "compressed" and index["lists"] == list_count(6000) // 2  # the full sample would not fit
    capsys.readouterr()
    assert search(["build", "--embeddings", files, "--output", str(tmp_path / "exact"), "--kind", "exact",
                   "--max_memory", "100MB"]) == 2
    err = capsys.readouterr().err
    assert f"needs about {human(Layout('exact', 6000, 64, row_group_bytes=read).build_memory)} to build" in err
    assert "--max_memory 100.0 MB" in err and "--kind compressed" in err
    assert not (tmp_path / "exact").exists()
    with pytest.raises(SystemExit):
        search(["build", "--embeddings", files, "--output", str(tmp_path / "x"), "--max_memory", "lots"])
    assert "must be a size such as 4GB" in capsys.readouterr().err


def test_a_compressed_index_on_gs_is_queried_through_a_local_copy_of_its_vectors(tmp_path, gcs, monkeypatch):
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))
    _synthetic_run(str(tmp_path / "run"), 3000, dim=64)
    root = f"gs://{gcs.bucket}/search"
    assert search(["build", "--embeddings", str(tmp_path / "run" / "embeddings-*.parquet"), "--output", root,
                   "--kind", "compressed"]) == 0
    out = str(tmp_path / "hits.json")
    assert search(["query", "--index", root, "--id", "img00007", "-k", "3", "--output", out]) == 0
    assert json.loads(open(out).read())[0]["id"] == "img00007"
    cached = [name for _, _, names in os.walk(tmp_path / "cache") for name in names]
    assert sorted(n.split("-")[0] for n in cached) == ["exact", "items"]  # fetched once, then read locally
    assert not any(".partial" in name for name in cached)


def test_an_existing_index_is_kept_unless_overwrite(corpus, tmp_path, capsys):
    target = str(tmp_path / "idx")
    files = os.path.join(corpus["run"], "embeddings-*.parquet")
    assert search(["build", "--embeddings", files, "--output", target]) == 0
    assert search(["build", "--embeddings", files, "--output", target]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert search(["build", "--embeddings", files, "--output", target, "--overwrite"]) == 0


def test_overwrite_publishes_the_new_pair_in_one_step_and_a_reader_never_mixes_two_builds(corpus, tmp_path,
                                                                                       monkeypatch):
    from pipeline.search import store as search_store

    target = tmp_path / "idx"
    files = os.path.join(corpus["run"], "embeddings-*.parquet")
    assert search(["build", "--embeddings", files, "--output", str(target)]) == 0
    old = json.loads((target / "search.json").read_text())
    assert search(["build", "--embeddings", files, "--output", str(target), "--overwrite"]) == 0
    new = json.loads((target / "search.json").read_text())
    assert new["files"] != old["files"]
    visible = [name for name in os.listdir(target) if not name.startswith(".")]  # .search.json.lock: the flip's lock
    assert sorted(visible) == sorted(["search.json", *(n for names in search_store.file_names(new).values()
                                                           for n in names)])
    opened = search_store.open_search_index(str(target))
    assert opened.items.num_rows == opened.vectors.count == new["count"]
    before = search_store._Read(json.dumps(old).encode())
    monkeypatch.setattr(search_store, "_manifest_version", lambda path: before)  # a reader that read it before
    with pytest.raises(search_store.SearchIndexError, match="rebuilt while it was being opened"):
        search_store.open_search_index(str(target))
    wrong = search_store._Read(json.dumps({**new, "count": new["count"] + 1}).encode())
    monkeypatch.setattr(search_store, "_manifest_version", lambda path: wrong)
    with pytest.raises(search_store.SearchIndexError, match="does not add up"):
        search_store.open_search_index(str(target))


def test_mistakes_get_clear_messages(corpus, tmp_path, capsys):
    assert search(["build", "--embeddings", corpus["run"], "--output", str(tmp_path / "x")]) == 2
    assert "is a folder: pass its files" in capsys.readouterr().err
    assert search(["query", "--index", str(tmp_path / "nothing"), "--id", "a"]) == 2
    assert "Build one with python -m pipeline.search build" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        search(["query", "--index", corpus["index"], "--id", "a", "--output", str(tmp_path / "hits.csv")])
    assert exit_.value.code == 2 and "name a .parquet or .json file" in capsys.readouterr().err


def test_build_from_an_index_root_uses_its_current_view(corpus, tmp_path):
    from pipeline.index.__main__ import main as index_main

    images = tmp_path / "images"
    shutil.copytree(corpus["images"], images)
    root, model = str(tmp_path / "root"), ["--model", "custom", "--model_handle", corpus["handle"], "--image_size",
                                           str(SIZE), "--embedding_dim", str(DIM)]

    def update():
        assert index_main(["update", "--input", str(images), "--index", root, *model,
                           "--direct_running_mode=in_memory", "--progress_interval=0"]) == 0

    assert index_main(["create", "--index", root, *model]) == 0
    update()
    (images / "copy-identical.jpg").unlink()  # removed from the corpus
    (images / "new.jpg").write_bytes(encode(corpus["tiles"]["chelsea-a.jpg"], "JPEG", quality=70))  # added
    update()
    index = str(tmp_path / "search")
    assert search(["build", "--index", root, "--output", index]) == 0
    with open(os.path.join(index, "search.json")) as f:
        items = pq.read_table(os.path.join(index, json.load(f)["files"]["items"][0])).to_pylist()
    assert sorted(os.path.basename(i["id"]) for i in items) == sorted(p.name for p in images.iterdir())
    out = str(tmp_path / "hits.parquet")
    assert search(["query", "--index", index, "--id", str(images / "new.jpg"), "-k", "2", "--output", out]) == 0
    assert os.path.basename(pq.read_table(out).to_pylist()[1]["id"]) == "chelsea-a.jpg"


def test_images_on_a_web_server_are_queried_and_drawn_through_the_pipelines_reader(corpus, tmp_path):
    from servers import WebServer

    server = WebServer(_resized_copy(corpus["tiles"]["rocket-b.jpg"], scale=0.7))
    try:
        out, sheet = str(tmp_path / "hits.json"), str(tmp_path / "sheet.png")
        query = f"{server.url}/flaky.jpg"  # answers 503 twice first: retried like a pipeline read
        assert search(["query", "--index", corpus["index"], "--image", query, "-k", "1", "--output", out,
                       "--contact_sheet", sheet]) == 0
        with open(out) as f:
            assert json.load(f)[0]["id"] == _path(corpus, "rocket-b.jpg")
        assert server.hits["/flaky.jpg"] == 4  # the query: two 503s, then the image; then the thumbnail
        with Image.open(sheet) as image:
            drawn = np.asarray(image.convert("RGB"))
        assert np.abs(_cell(drawn, 0, 0) - _thumbnail(_path(corpus, "rocket-b.jpg"))).mean() < 8
    finally:
        server.close()


def test_an_index_of_stand_in_vectors_says_its_similarities_mean_nothing(tmp_path, capsys):
    _synthetic_run(str(tmp_path / "run"), 20, weights="STAND-IN: random weights")
    assert search(["build", "--embeddings", str(tmp_path / "run" / "*.parquet"), "--output", str(tmp_path / "i")]) == 0
    assert search(["query", "--index", str(tmp_path / "i"), "--id", "img00001"]) == 0
    assert "random-weight stand-in model: similarities are NOT meaningful" in capsys.readouterr().err


def test_a_budget_nothing_fits_is_refused_naming_the_smallest_layout_it_tried():
    from pipeline.search.vector_index import DIMS_PER_CODE_BYTE, MemoryBudgetError, choose_layout, list_count

    with pytest.raises(MemoryBudgetError) as refused:
        choose_layout("auto", 500_000, 1664, 700 * 2**20)
    message = str(refused.value)
    smallest_codes = 1664 // max(DIMS_PER_CODE_BYTE)
    assert f"IVF{list_count(500_000) // 16},PQ{2 * smallest_codes}x4fs" in message  # fewest lists, smallest codes
    assert "more than --max_memory 700.0 MB" in message


def test_a_build_under_a_budget_that_binds_stays_within_it(tmp_path):
    """The budget is set just below what exact and ann need, so auto must pick compressed codes; the build's peak
    resident memory (VmHWM, read by the process itself at the end) stays within the budget. Files of one whole
    row group: the reader holds it, and the estimate counts it."""
    import subprocess
    import sys

    from pipeline.search.collection import from_files
    from pipeline.search.vector_index import Layout, list_count

    _synthetic_run(str(tmp_path / "run"), 40_000, dim=512)
    files = str(tmp_path / "run" / "embeddings-*.parquet")
    collection = from_files(files)
    assert collection.row_group_bytes > 40_000 * 512 * 4  # the whole file is one row group
    budget = min(Layout(kind, collection.count, collection.dim, row_group_bytes=collection.row_group_bytes).build_memory
                 for kind in ("exact", "ann")) - 2**20
    assert list_count(40_000) > 1
    probe = ("import sys; from pipeline.search.__main__ import main; code = main(sys.argv[1:]); "
             "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "build", "--embeddings", files, "--output",
                           str(tmp_path / "idx"), "--max_memory", f"{budget}"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert "compressed search" in done.stderr
    peak = int(done.stdout.split()[-1]) * 1024
    assert peak <= budget, f"peak {peak >> 20} MB over the budget of {budget >> 20} MB"
    print(f"peak {peak >> 20} MB under a budget of {budget >> 20} MB")
