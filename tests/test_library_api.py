"""The library API, used only through its public names (beam_image_embeddings) as a Beam user would.

Oracles never reuse the code under test: pixels are decoded here with PIL directly, and vectors come from
calling the SavedModel itself.
"""

import collections
import hashlib
import json
import os
import re
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import beam_image_embeddings as api
from helpers import REPO, SAMPLES, examples, run_and_collect

TINY_SIDE = 32


def _readme_example() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## Use it in your own pipeline", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _pngs(folder, names=("astronaut.jpg", "chelsea.png", "rocket.jpg")) -> list:
    """RGB PNGs (lossless, no alpha), so that PIL's own decode and resize below are the exact preprocessing."""
    folder.mkdir(exist_ok=True)
    paths = []
    for name in names:
        path = folder / (os.path.splitext(name)[0] + ".png")
        Image.open(os.path.join(SAMPLES, name)).convert("RGB").save(path)
        paths.append(str(path))
    return paths


def _pixels(path: str, side: int) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC), np.uint8)


def _model_vectors(handle: str, pixels: np.ndarray) -> np.ndarray:
    import tensorflow_hub as hub

    return hub.load(handle)(pixels.astype(np.float32) / 255.0).numpy()


def _assert_close(produced: np.ndarray, expected: np.ndarray) -> None:
    assert produced.dtype == np.float32
    assert np.abs(produced - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A custom TF2 SavedModel whose vector is each channel's mean and max: computable by hand, fast to load."""
    import tensorflow as tf

    class MeanAndMax(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, TINY_SIDE, TINY_SIDE, 3], tf.float32)])
        def __call__(self, images):
            return tf.concat([tf.reduce_mean(images, [1, 2]), tf.reduce_max(images, [1, 2])], axis=-1)

    path = str(tmp_path_factory.mktemp("tiny") / "mean_and_max")
    tf.saved_model.save(MeanAndMax(), path)
    return path


def _tiny_vector(path: str) -> np.ndarray:
    pixels = _pixels(path, TINY_SIDE).astype(np.float32) / 255.0
    return np.concatenate([pixels.mean(axis=(0, 1)), pixels.max(axis=(0, 1))])


def test_the_readme_example_runs_as_written_and_gives_the_models_vectors(tmp_path, mobilenet_handle):
    """The README's code, verbatim, with tfhub.dev's handle served from TFHUB_CACHE_DIR (hub's own cache
    layout: the SHA-1 of the handle), as on a machine that downloaded the model before."""
    handle = api.MODELS["mobilenet_v2_130_224"].handle
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    os.symlink(mobilenet_handle, cache / hashlib.sha1(handle.encode()).hexdigest())
    paths = _pngs(tmp_path / "photos")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "example.py").write_text(_readme_example())

    env = {**os.environ, "TFHUB_CACHE_DIR": str(cache), "PYTHONPATH": REPO}
    ran = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]

    def rows(prefix):
        return [json.loads(line) for path in sorted(tmp_path.glob(f"{prefix}-*.jsonl")) for line in open(path)]

    vectors = {row["id"]: np.asarray(row["vector"], np.float32) for row in rows("vectors")}
    relative = [os.path.relpath(path, tmp_path) for path in paths]  # the glob's own names are the ids
    assert sorted(vectors) == sorted(relative)
    expected = _model_vectors(mobilenet_handle, np.stack([_pixels(path, 224) for path in paths]))
    _assert_close(np.stack([vectors[name] for name in relative]), expected)
    [failure] = rows("failures")
    assert failure["id"].endswith("notes.txt") and failure["stage"] == "decode"
    assert "Not a supported image" in failure["error"]


def test_the_model_handler_keeps_beams_contract_unkeyed_and_keyed(mobilenet_handle):
    model = api.model_config("mobilenet_v2_130_224", handle=mobilenet_handle, batch_size=2)
    images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    expected = _model_vectors(mobilenet_handle, images)

    unkeyed = run_and_collect(lambda p: p | beam.Create(list(images)) | RunInference(api.EmbeddingModelHandler(model)))
    by_example = {result.example.tobytes(): result for result in unkeyed}
    assert len(by_example) == 3
    for pixels, vector in zip(images, expected):
        result = by_example[pixels.tobytes()]
        assert result.model_id == mobilenet_handle
        _assert_close(result.inference, vector)

    keyed = run_and_collect(lambda p: p | beam.Create([(f"k{i}", pixels) for i, pixels in enumerate(images)])
                            | RunInference(KeyedModelHandler(api.EmbeddingModelHandler(model))))
    assert sorted(key for key, _ in keyed) == ["k0", "k1", "k2"]
    for key, result in keyed:
        _assert_close(result.inference, expected[int(key[1:])])


def test_a_batch_the_handler_cannot_embed_goes_to_beams_failed_inferences(tiny_model):
    model = api.model_config("custom", handle=tiny_model, image_size=TINY_SIDE, dim=6, batch_size=1)
    right = np.zeros((TINY_SIDE, TINY_SIDE, 3), np.uint8)
    wrong = np.zeros((TINY_SIDE, TINY_SIDE, 3), np.float64)

    def build(p):
        main, other = (p | beam.Create([right, wrong])
                       | RunInference(api.EmbeddingModelHandler(model)).with_exception_handling())
        return ((main | "Ok" >> beam.Map(lambda r: ("ok", str(r.example.dtype))),
                 other.failed_inferences | "Failed" >> beam.Map(lambda f: ("failed", str(f[1]))))
                | beam.Flatten())

    outcomes = sorted(run_and_collect(build))
    assert outcomes[1] == ("ok", "uint8")
    assert outcomes[0][0] == "failed" and f"uint8 RGB pixels of shape ({TINY_SIDE}, {TINY_SIDE}, 3)" in outcomes[0][1]


# What an element from a user's PCollection may be, and what it must come to: ("embedded", id) or (stage, id).
_KINDS = ("uri", "pair", "row", "row_without_id", "missing", "not_an_image", "number", "none", "triple", "nul_id")
_text_ids = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@settings(max_examples=examples(6))
@given(st.lists(st.tuples(st.sampled_from(_KINDS), _text_ids), min_size=1, max_size=8))
def test_every_element_comes_out_once_embedded_or_failed(tiny_model, tmp_path_factory, drawn):
    folder = tmp_path_factory.mktemp("elements")
    [good] = _pngs(folder, ("chelsea.png",))
    not_an_image = folder / "notes.png"
    not_an_image.write_bytes(b"%PDF-1.4 not pixels")
    missing = str(folder / "missing.png")
    elements, expected = [], []
    for kind, id_ in drawn:
        element, outcome = {
            "uri": (good, ("embedded", good)),
            "pair": ((id_, good), ("embedded", id_)),
            "row": ({"id": id_, "uri": good, "width": 3}, ("embedded", id_)),
            "row_without_id": ({"uri": good}, ("embedded", good)),
            "missing": ((id_, missing), ("read", id_)),
            "not_an_image": ((id_, str(not_an_image)), ("decode", id_)),
            "number": (7, ("manifest", "7")),
            "none": (None, ("manifest", "None")),
            "triple": (("a", "b", "c"), ("manifest", "('a', 'b', 'c')")),
            "nul_id": ((id_ + "\x00", good), ("manifest", None)),
        }[kind]
        elements.append(element)
        expected.append(outcome)
    model = api.model_config("custom", handle=tiny_model, image_size=TINY_SIDE, dim=6, batch_size=3)

    def build(p):
        results = p | beam.Create(elements, reshuffle=False) | api.ImagesToEmbeddings(model)
        return ((results.embeddings | "E" >> beam.Map(lambda e: ("embedded", e.id, e.vector)),
                 results.failures | "F" >> beam.Map(lambda f: (f.stage, f.id, f.error)))
                | beam.Flatten())

    outcomes = run_and_collect(build)
    assert len(outcomes) == len(elements)
    nul_failures = [o for o in outcomes if o[0] == "manifest" and "NUL" in o[2]]
    assert len(nul_failures) == sum(1 for outcome in expected if outcome[1] is None)
    got = collections.Counter((stage, id_) for stage, id_, _ in outcomes if (stage, id_, _) not in nul_failures)
    assert got == collections.Counter(outcome for outcome in expected if outcome[1] is not None)
    for stage, _, vector_or_error in outcomes:
        if stage == "embedded":
            _assert_close(vector_or_error, _tiny_vector(good))
        else:
            assert vector_or_error.endswith(".") and len(vector_or_error) > 20  # one readable sentence


def test_a_model_option_that_contradicts_the_registry_says_what_to_change():
    with pytest.raises(api.ModelConfigError, match="outputs 1664-dim vectors.*--model custom"):
        api.model_config("mobilenet_v2_130_224", dim=1536)


def test_the_public_names_import_without_tensorflow():
    code = ("import sys, beam_image_embeddings as api; "
            "missing = [n for n in api.__all__ if not hasattr(api, n)]; "
            "print(missing, 'tensorflow' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["[]", "False"]

