"""The model registry resolves --model / --model_handle / --image_size / --embedding_dim, or says why not."""

import pytest

from pipeline.models import MODELS, ModelConfigError, resolve_model


def test_registry_holds_both_hub_models_with_their_published_facts():
    mobilenet, inception = MODELS["mobilenet_v2_130_224"], MODELS["inception_resnet_v2"]
    assert (mobilenet.input_size, mobilenet.dim, mobilenet.resizable) == (224, 1664, False)
    assert (inception.input_size, inception.dim, inception.resizable) == (299, 1536, True)
    assert mobilenet.handle == "https://tfhub.dev/google/imagenet/mobilenet_v2_130_224/feature_vector/4"
    assert inception.handle == "https://tfhub.dev/google/imagenet/inception_resnet_v2/feature_vector/4"


def test_a_registry_model_resolves_to_its_defaults():
    assert resolve_model("mobilenet_v2_130_224") == MODELS["mobilenet_v2_130_224"]


def test_handle_override_keeps_size_and_dim(tmp_path):
    spec = resolve_model("inception_resnet_v2", handle="gs://bucket/irv2")
    assert (spec.handle, spec.input_size, spec.dim) == ("gs://bucket/irv2", 299, 1536)


def test_local_handle_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("mobilenet_v2_130_224", handle="model").handle == str(tmp_path / "model")


def test_resizable_model_accepts_another_image_size():
    assert resolve_model("inception_resnet_v2", image_size=384).input_size == 384


def test_fixed_size_model_rejects_another_image_size():
    with pytest.raises(ModelConfigError, match="fixed 224x224"):
        resolve_model("mobilenet_v2_130_224", image_size=299)


def test_unknown_model_lists_the_choices():
    with pytest.raises(ModelConfigError, match="mobilenet_v2_130_224, inception_resnet_v2, custom"):
        resolve_model("resnet50")


def test_registry_dim_cannot_be_contradicted():
    with pytest.raises(ModelConfigError, match="outputs 1664-dim"):
        resolve_model("mobilenet_v2_130_224", dim=512)


def test_custom_model_needs_handle_size_and_dim():
    with pytest.raises(ModelConfigError, match="--model_handle, --image_size, --embedding_dim"):
        resolve_model("custom")
    spec = resolve_model("custom", handle="gs://m", image_size=160, dim=1280)
    assert (spec.name, spec.handle, spec.input_size, spec.dim) == ("custom", "gs://m", 160, 1280)


def test_tiny_image_size_is_rejected():
    with pytest.raises(ModelConfigError, match="at least"):
        resolve_model("inception_resnet_v2", image_size=8)
