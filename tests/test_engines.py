"""The compiled engine: chosen per model, compiled once and reused, equal to TensorFlow within a tested tolerance."""

import concurrent.futures
import gc
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import PHOTO_NAMES, REPO, assert_matches_direct_calls, encode, photo, read_embeddings, run_pipeline
from pipeline.engine import EngineError, compile_litert, fidelity, resolve_engine
from pipeline.fingerprint import model_fingerprint
from pipeline.models import MODELS
from transforms.decode import PreprocessConfig, decode_image
from transforms.embed import DecodedImagesModelHandler, EmbedConfig, HubEmbedder
from transforms.litert_engine import LiteRTEmbedder

MOBILENET, INCEPTION = MODELS["mobilenet_v2_130_224"], MODELS["inception_resnet_v2"]


def _mobilenet(handle, **kwargs) -> EmbedConfig:
    return EmbedConfig(handle=handle, image_size=MOBILENET.input_size, dim=MOBILENET.dim, **kwargs)


def _compiled(config: EmbedConfig, cache) -> str:
    return compile_litert(HubEmbedder(config), config.image_size, model_fingerprint(config.handle), str(cache))


def _never_loaded():
    raise AssertionError("this path must not need the TensorFlow model")


def _photos(size):
    """Real photos and 96x96 tiles of them, decoded with the pipeline's preprocessing."""
    config = PreprocessConfig(image_size=size)
    images = [decode_image(encode(photo(name), "PNG"), config) for name in PHOTO_NAMES]
    images += [decode_image(encode(photo(name)[100:196, 150:246], "PNG"), config) for name in PHOTO_NAMES[:4]]
    return np.stack(images)


def _compare_engines(handle, size, dim, cache):
    config = EmbedConfig(handle=handle, image_size=size, dim=dim)
    compiled = _compiled(config, cache)
    pixels = _photos(size)
    expected = HubEmbedder(config)(pixels)
    produced = LiteRTEmbedder(compiled, size, dim)(pixels)
    names = [str(i) for i in range(len(pixels))]
    assert_matches_direct_calls(dict(zip(names, produced)), dict(zip(names, expected)))
    return np.abs(produced - expected).max() / np.linalg.norm(expected, axis=1).max()


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory):
    """A small custom convolutional feature-vector model (dim 24) with the hub call convention."""
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(3)
            self.kernel = tf.Variable(rng.normal(0, 0.3, (5, 5, 3, 24)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 64, 64, 3], tf.float32)])
        def __call__(self, images):
            features = tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides=2, padding="SAME"))
            return tf.reduce_mean(features, axis=[1, 2])

    path = str(tmp_path_factory.mktemp("models") / "custom")
    tf.saved_model.save(Model(), path)
    return path


@pytest.fixture(scope="module")
def unconvertible_model(tmp_path_factory):
    """A model whose graph uses string ops that LiteRT's builtin kernels do not have."""
    import tensorflow as tf

    class Model(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def __call__(self, images):
            return tf.strings.to_number(tf.strings.as_string(tf.reduce_mean(images, axis=[1, 2])))

    path = str(tmp_path_factory.mktemp("models") / "strings")
    tf.saved_model.save(Model(), path)
    return path


def test_litert_equals_tensorflow_on_mobilenet(mobilenet_handle, tmp_path):
    assert _compare_engines(mobilenet_handle, MOBILENET.input_size, MOBILENET.dim, tmp_path) < 1e-4


def test_litert_equals_tensorflow_on_inception_resnet_v2(inception_handle, tmp_path):
    assert _compare_engines(inception_handle, INCEPTION.input_size, INCEPTION.dim, tmp_path) < 1e-4


def test_litert_equals_tensorflow_on_a_custom_model(custom_model, tmp_path):
    assert _compare_engines(custom_model, 64, 24, tmp_path) < 1e-4


def test_one_interpreter_per_thread_makes_concurrent_batches_safe(mobilenet_handle, tmp_path):
    compiled = _compiled(_mobilenet(mobilenet_handle), tmp_path)
    embedder = LiteRTEmbedder(compiled, MOBILENET.input_size, MOBILENET.dim, threads=1)
    pixels = _photos(MOBILENET.input_size)
    batches = [pixels[i % 5: i % 5 + 1 + i % 4] for i in range(16)]  # different sizes, interleaved
    expected = [embedder(batch) for batch in batches]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        produced = list(pool.map(embedder, batches))
    for a, b in zip(produced, expected):
        np.testing.assert_array_equal(a, b)


def test_a_litert_worker_never_imports_tensorflow(mobilenet_handle, tmp_path):
    compiled = _compiled(_mobilenet(mobilenet_handle), tmp_path)
    size, dim = MOBILENET.input_size, MOBILENET.dim
    script = (
        "import sys, numpy as np\n"
        "from transforms.embed import EmbedConfig, load_embedder\n"
        f"config = EmbedConfig(handle='unused', image_size={size}, dim={dim}, engine='litert', compiled={compiled!r})\n"
        f"vectors = load_embedder(config)(np.zeros((2, {size}, {size}, 3), np.uint8))\n"
        "print(vectors.shape, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == f"(2, {dim}) False"


def test_auto_picks_the_registrys_engine_and_records_it(tmp_path, mobilenet_handle, inception_handle, custom_model):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(encode(photo("rocket")[:80, :80], "PNG"))
    cache = str(tmp_path / "cache")
    for name, args, engine in (
        ("mobilenet", ["--model_handle", mobilenet_handle], "litert"),
        ("inception", ["--model", "inception_resnet_v2", "--model_handle", inception_handle], "tensorflow"),
        ("custom", ["--model", "custom", "--model_handle", custom_model, "--image_size", "64",
                    "--embedding_dim", "24"], "tensorflow"),
    ):
        out = tmp_path / name
        assert run_pipeline("--input", str(images), "--output", str(out), "--compiled_cache", cache, *args) == 0
        metadata = pq.read_schema(glob.glob(f"{out}/embeddings-*.parquet")[0]).metadata
        assert metadata[b"embedding.engine"].decode().startswith(engine)
        assert json.loads((out / "_run_report.json").read_text())["engine"].startswith(engine)


def test_loaded_objects_are_kept_out_of_collections_while_a_run_embeds_and_collected_as_usual_after(
        tmp_path, mobilenet_handle, monkeypatch):
    frozen_at_each_call = []
    original = LiteRTEmbedder.__call__

    def spy(self, images):
        frozen_at_each_call.append(gc.get_freeze_count())
        return original(self, images)

    monkeypatch.setattr(LiteRTEmbedder, "__call__", spy)
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(encode(photo("coffee")[:80, :80], "PNG"))
    assert run_pipeline("--input", str(images), "--output", str(tmp_path / "out"), "--engine", "litert",
                        "--compiled_cache", str(tmp_path / "cache"), "--model_handle", mobilenet_handle) == 0
    assert frozen_at_each_call[-1] > 0  # the pipeline's own call; earlier ones are the launcher's probes
    assert gc.get_freeze_count() == 0

    [compiled] = glob.glob(f"{tmp_path}/cache/*.tflite")  # a worker process freezes on its own, after loading
    handler = DecodedImagesModelHandler(_mobilenet(mobilenet_handle, engine="litert", compiled=compiled))
    try:
        handler.load_model()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_compiled_once_and_reused_by_later_runs_and_by_a_copy_of_the_model(tmp_path, mobilenet_handle):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(encode(photo("chelsea")[:80, :80], "PNG"))
    cache = tmp_path / "cache"
    copy = tmp_path / "copy"
    shutil.copytree(mobilenet_handle, copy)
    assert run_pipeline("--input", str(images), "--output", str(tmp_path / "o1"), "--compiled_cache", str(cache),
                        "--model_handle", mobilenet_handle) == 0
    [artifact] = glob.glob(f"{cache}/*.tflite")
    built = os.stat(artifact).st_mtime_ns
    assert run_pipeline("--input", str(images), "--output", str(tmp_path / "o2"), "--compiled_cache", str(cache),
                        "--model_handle", str(copy)) == 0
    assert glob.glob(f"{cache}/*.tflite") == [artifact] and os.stat(artifact).st_mtime_ns == built
    np.testing.assert_array_equal(read_embeddings(str(tmp_path / "o1")).column("embedding").to_pylist(),
                                  read_embeddings(str(tmp_path / "o2")).column("embedding").to_pylist())


def test_custom_models_run_on_tensorflow_under_auto_and_an_unconvertible_one_fails_clearly_under_litert(
        tmp_path, unconvertible_model):
    config = EmbedConfig(handle=unconvertible_model, image_size=32, dim=3)
    fingerprint = model_fingerprint(unconvertible_model)
    embed, note = resolve_engine(config, "auto", "custom", fingerprint, str(tmp_path), _never_loaded)
    assert embed.engine == "tensorflow" and note is None
    with pytest.raises(EngineError, match="--engine litert: the model could not be converted for LiteRT"):
        resolve_engine(config, "litert", "custom", fingerprint, str(tmp_path), lambda: HubEmbedder(config))


def test_auto_falls_back_with_a_note_when_conversion_fails(tmp_path, unconvertible_model, monkeypatch):
    from pipeline import models

    spec = models.ModelSpec(name="strings", handle=unconvertible_model, input_size=32, dim=3,
                            preferred_engine="litert")
    monkeypatch.setitem(models.MODELS, "strings", spec)
    config = EmbedConfig(handle=unconvertible_model, image_size=32, dim=3)
    embed, note = resolve_engine(config, "auto", "strings", model_fingerprint(unconvertible_model), str(tmp_path),
                                 lambda: HubEmbedder(config))
    assert embed.engine == "tensorflow"
    assert note.startswith("note: the model could not be converted for LiteRT") and note.endswith("using TensorFlow.")


def test_bfloat16_runs_on_tensorflow_and_says_so(tmp_path, mobilenet_handle):
    config = _mobilenet(mobilenet_handle, bfloat16=True)
    fingerprint = model_fingerprint(mobilenet_handle)
    embed, note = resolve_engine(config, "auto", MOBILENET.name, fingerprint, str(tmp_path), _never_loaded)
    assert embed.engine == "tensorflow" and note == "note: --bfloat16 runs on TensorFlow, not LiteRT."
    with pytest.raises(EngineError, match="does not apply to --engine litert"):
        resolve_engine(config, "litert", MOBILENET.name, fingerprint, str(tmp_path), _never_loaded)


def test_a_compiled_model_in_the_cache_changes_no_refusal_and_a_wrong_dim_is_named(tmp_path, mobilenet_handle,
                                                                                    capsys):
    cache = str(tmp_path / "cache")
    config = _mobilenet(mobilenet_handle)
    embed, _ = resolve_engine(config, "litert", MOBILENET.name, model_fingerprint(mobilenet_handle), cache,
                              lambda: HubEmbedder(config))  # compiled and verified: later runs skip TensorFlow
    common = ["--input", os.path.join(REPO, "samples"), "--model_handle", mobilenet_handle, "--compiled_cache", cache]
    assert run_pipeline(*common, "--output", str(tmp_path / "a"), "--engine", "litert", "--bfloat16") == 2
    assert "does not apply to --engine litert" in capsys.readouterr().err
    assert run_pipeline(*common, "--output", str(tmp_path / "b"), "--engine", "litert", "--model", "custom",
                        "--image_size", str(MOBILENET.input_size), "--embedding_dim", "1000") == 2
    err = capsys.readouterr().err
    assert f"The model outputs {MOBILENET.dim}-dim vectors, not --embedding_dim 1000: pass --embedding_dim " \
           f"{MOBILENET.dim} (the compiled model {embed.compiled} is fine)." in err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_the_launchers_fidelity_check_measures_the_difference(mobilenet_handle, tmp_path):
    config = _mobilenet(mobilenet_handle)
    reference = HubEmbedder(config)
    embed, _ = resolve_engine(config, "litert", MOBILENET.name, model_fingerprint(mobilenet_handle), str(tmp_path),
                              lambda: reference)
    assert embed.engine == "litert" and 0 <= fidelity(embed, reference) < 1e-4


def test_a_later_job_starts_without_tensorflow_once_the_model_is_compiled_and_verified(tmp_path, mobilenet_handle):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(encode(photo("coffee")[:80, :80], "PNG"))
    cache = tmp_path / "cache"
    script = (
        "import sys\n"
        "from pipeline.run import main\n"
        f"code = main(['--input', {str(images)!r}, '--output', sys.argv[1], '--model_handle', {mobilenet_handle!r}, "
        f"'--compiled_cache', {str(cache)!r}, '--direct_running_mode=in_memory'])\n"
        "print(code, 'tensorflow' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", script, str(tmp_path / "o1")], capture_output=True, text=True,
                           cwd=REPO)
    second = subprocess.run([sys.executable, "-c", script, str(tmp_path / "o2")], capture_output=True, text=True,
                            cwd=REPO)
    assert first.stdout.splitlines()[-1] == "0 True"  # compiled and verified against TensorFlow
    assert second.stdout.splitlines()[-1] == "0 False", second.stderr[-2000:]  # launcher and worker: LiteRT only
    assert glob.glob(f"{cache}/*.tflite.verified.json")
