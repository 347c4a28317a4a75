"""Stand-ins look like the hub modules to hub.load, and tell different images apart."""

import json
import os

import numpy as np
import pytest

from helpers import PHOTO_NAMES, encode, photo
from pipeline.models import MODELS
from pipeline.standin_models import STANDIN_MARKER, standin_info
from transforms.decode import PreprocessConfig, decode_image


@pytest.fixture(scope="module", params=["mobilenet_v2_130_224", "inception_resnet_v2"])
def loaded(request, mobilenet_handle, inception_handle):
    import tensorflow_hub as hub

    handle = {"mobilenet_v2_130_224": mobilenet_handle, "inception_resnet_v2": inception_handle}[request.param]
    return MODELS[request.param], handle, hub.load(handle)


def _photos_at(size):
    config = PreprocessConfig(image_size=size)
    return np.stack([decode_image(encode(photo(n), "PNG"), config) for n in PHOTO_NAMES]).astype(np.float32) / 255.0


def test_standin_follows_the_hub_call_convention(loaded):
    spec, _, model = loaded
    images = _photos_at(spec.input_size)[:2]
    plain, inference = model(images).numpy(), model(images, training=False).numpy()
    assert plain.shape == (2, spec.dim) and plain.dtype == np.float32
    np.testing.assert_array_equal(plain, inference)
    assert len(model.variables) > 0 and model.regularization_losses == []


def test_calibrated_standin_gives_clearly_different_vectors_for_different_photos(loaded):
    spec, _, model = loaded
    vectors = model(_photos_at(spec.input_size)).numpy()
    norms = np.linalg.norm(vectors, axis=1)
    assert norms.min() > 1.0  # an uncalibrated stand-in collapses to norms of about 1e-10
    distances = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1)[np.triu_indices(len(vectors), 1)]
    assert distances.min() > 0.1 * norms.mean()


def test_standin_is_marked_as_not_meaningful(loaded):
    spec, handle, _ = loaded
    info = standin_info(handle)
    assert info["standin"] is True and "NOT meaningful" in info["warning"] and info["model"] == spec.name
    assert json.load(open(os.path.join(handle, STANDIN_MARKER))) == info


def test_real_model_directories_carry_no_standin_marker(tmp_path):
    assert standin_info(str(tmp_path)) is None


def test_resizable_standin_accepts_other_sizes(inception_handle):
    import tensorflow_hub as hub

    model = hub.load(inception_handle)
    assert model(_photos_at(160)[:1]).shape == (1, MODELS["inception_resnet_v2"].dim)
