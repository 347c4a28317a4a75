"""The model registry: the one place that knows each model's handle, input size and dim.

Everything else asks this module. A custom TF Hub feature-vector model is described by the same
`ModelSpec`, built from command-line options instead of a registry entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import urllib.parse
from typing import Optional

# Near-duplicate threshold of the hub's ImageNet feature vectors (docs/search.md: how it was chosen).
DEFAULT_DUPLICATE_THRESHOLD = 0.95


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a feature-vector model.

    `input_size` is the square side the images are resized to. `resizable` says the model accepts
    other sizes (so `--image_size` may change it). `preferred_engine` is what `--engine auto` runs it on. `standin_architecture` names the Keras application
    whose random-weight copy stands in for the model where its weights cannot be downloaded.
    """

    name: str
    handle: str
    input_size: int
    dim: int
    resizable: bool = False
    preferred_engine: str = "tensorflow"  # the CPU engine measured fastest for it (benchmarks/engines.py)
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD  # cosine similarity of near-duplicates
    standin_architecture: Optional[str] = None
    standin_kwargs: tuple = ()


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mobilenet_v2_130_224",
            handle="https://tfhub.dev/google/imagenet/mobilenet_v2_130_224/feature_vector/4",
            input_size=224,
            dim=1664,
            preferred_engine="litert",
            standin_architecture="MobileNetV2",
            standin_kwargs=(("alpha", 1.3),),
        ),
        ModelSpec(
            name="inception_resnet_v2",
            handle="https://tfhub.dev/google/imagenet/inception_resnet_v2/feature_vector/4",
            input_size=299,
            dim=1536,
            resizable=True,
            standin_architecture="InceptionResNetV2",
        ),
    )
}

CUSTOM_MODEL = "custom"

# The smallest side the registry's convolutional models accept.
MIN_IMAGE_SIZE = 32


class ModelConfigError(ValueError):
    """The model options do not describe a usable model."""


def resolve_model(
    name: str,
    handle: Optional[str] = None,
    image_size: Optional[int] = None,
    dim: Optional[int] = None,
) -> ModelSpec:
    """Returns the spec for `--model NAME` with the user's overrides applied.

    `custom` needs a handle, an image size and a dim; a registry model may take another handle (for
    example a gs:// mirror or a local SavedModel directory) and, when it is resizable, another size.
    """
    if name == CUSTOM_MODEL:
        missing = [
            flag
            for flag, value in (("--model_handle", handle), ("--image_size", image_size), ("--embedding_dim", dim))
            if value is None
        ]
        if missing:
            raise ModelConfigError(f"--model custom needs {', '.join(missing)}.")
        spec = ModelSpec(name=CUSTOM_MODEL, handle=handle, input_size=image_size, dim=dim, resizable=True)
    else:
        if name not in MODELS:
            known = ", ".join([*MODELS, CUSTOM_MODEL])
            raise ModelConfigError(f"Unknown model {name!r}; choose one of: {known}.")
        spec = MODELS[name]
        if dim is not None and dim != spec.dim:
            raise ModelConfigError(
                f"Model {name} outputs {spec.dim}-dim vectors; --embedding_dim {dim} contradicts the registry. "
                f"Use --model custom for a different model."
            )
        if image_size is not None and image_size != spec.input_size and not spec.resizable:
            raise ModelConfigError(
                f"Model {name} takes a fixed {spec.input_size}x{spec.input_size} input; "
                f"--image_size {image_size} is not allowed for it."
            )
        spec = dataclasses.replace(spec, handle=handle or spec.handle, input_size=image_size or spec.input_size)
    if os.path.isdir(spec.handle):  # record where a local model really is, not the launch directory's view
        spec = dataclasses.replace(spec, handle=os.path.abspath(spec.handle))
    if spec.input_size < MIN_IMAGE_SIZE:
        raise ModelConfigError(f"--image_size must be at least {MIN_IMAGE_SIZE}, got {spec.input_size}.")
    if spec.dim < 1:
        raise ModelConfigError(f"--embedding_dim must be positive, got {spec.dim}.")
    return spec


def duplicate_threshold(model_name: str) -> float:
    """The registry's near-duplicate threshold for a model; custom models get the hub models' default."""
    spec = MODELS.get(model_name)
    return spec.duplicate_threshold if spec else DEFAULT_DUPLICATE_THRESHOLD


def is_remote_hub_handle(handle: str) -> bool:
    return urllib.parse.urlparse(handle).scheme in ("http", "https")


def is_cached_in_hub_cache(handle: str) -> bool:
    """True when tensorflow_hub would load `handle` from TFHUB_CACHE_DIR without the network.

    tensorflow_hub stores a downloaded module under the SHA-1 of its handle.
    """
    cache = os.environ.get("TFHUB_CACHE_DIR")
    if not cache:
        return False
    module_dir = os.path.join(cache, hashlib.sha1(handle.encode("utf8")).hexdigest())
    return os.path.isfile(os.path.join(module_dir, "saved_model.pb"))


def hub_host_reachable(handle: str, timeout_s: float = 5.0) -> bool:
    """Whether the host serving a remote handle accepts a TCP connection within `timeout_s`.

    A cheap first check so that a caller can say "the hub is unreachable" in seconds instead of
    waiting for a download to time out.
    """
    parsed = urllib.parse.urlparse(handle)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def handle_available(handle: str, timeout_s: float = 5.0) -> bool:
    """Whether `handle` can be loaded without waiting on an unreachable network."""
    if not is_remote_hub_handle(handle):
        return True
    return is_cached_in_hub_cache(handle) or hub_host_reachable(handle, timeout_s)


def main(argv=None) -> int:
    """`python -m pipeline.models available MODEL`: exit 0 when the model's hub handle can be reached."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.models", description="Model registry commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    available = commands.add_parser("available", help="Exit 0 when MODEL's default handle can be reached.")
    available.add_argument("model", choices=sorted(MODELS))
    args = parser.parse_args(argv)
    handle = MODELS[args.model].handle
    reachable = handle_available(handle)
    print(handle if reachable else f"unreachable: {handle}")
    return 0 if reachable else 1


if __name__ == "__main__":
    raise SystemExit(main())
