"""Session fixtures: stand-in SavedModels (built once, cached on disk across sessions) and image corpora."""

from __future__ import annotations

import os

import pytest

from helpers import REPO, SAMPLES

STANDIN_CACHE = os.environ.get("STANDIN_CACHE_DIR", os.path.join(REPO, ".cache", "standins"))


def _standin(name: str) -> str:
    from pipeline.models import MODELS
    from pipeline.standin_models import cached_standin, load_calibration_images

    spec = MODELS[name]
    return cached_standin(spec, STANDIN_CACHE, load_calibration_images(os.path.join(SAMPLES, "*"), spec))


@pytest.fixture(scope="session")
def mobilenet_handle() -> str:
    return _standin("mobilenet_v2_130_224")


@pytest.fixture(scope="session")
def inception_handle() -> str:
    return _standin("inception_resnet_v2")
