"""Choosing and compiling the inference engine, once per job, in the launcher.

`auto` takes the engine the registry records as measured fastest for the model on CPU (TensorFlow for
custom models). LiteRT needs the model converted: the launcher loads the hub handle as always, converts
it with TensorFlow's converter (the uint8 -> [0, 1] cast inside the graph) and stores the artifact where
every worker can read it, keyed by the model's content fingerprint, the input size and the converter
version, so later runs reuse it. Before use, the artifact must give TensorFlow's vectors on probe images;
if it cannot be converted or does not, `auto` falls back to TensorFlow with a note and `litert` fails.
The TensorFlow model is loaded once, by the launcher's model check, and serves the conversion and the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.models import MODELS
from pipeline.options import ENGINES
from pipeline.storage import read_bytes, write_bytes
from transforms.embed import EmbedConfig, HubEmbedder, load_embedder

# Max abs difference allowed between LiteRT's and TensorFlow's vectors, relative to the vectors' norm.
# Measured on the stand-ins: 2e-5 absolute at norms of about 13 (1.7e-6 relative); 1e-4 leaves room for
# other CPUs' kernels while staying far below the distance between different images.
RELATIVE_TOLERANCE = 1e-4


class EngineError(RuntimeError):
    """The engine asked for cannot run this model; exit code 2."""


def default_cache(temp_location: Optional[str]) -> str:
    """Where compiled models live: under --temp_location when set (every Dataflow worker reads it), else locally."""
    if temp_location:
        return FileSystems.join(temp_location, "compiled-models")
    return os.path.join(os.path.expanduser("~"), ".cache", "beam-image-embeddings", "compiled")


def _converter_version() -> str:
    from importlib.metadata import version

    return f"tf{version('tensorflow')}"


def compiled_path(cache: str, fingerprint: str, image_size: int) -> str:
    digest = fingerprint.split(":", 1)[-1][:24]
    return FileSystems.join(cache, f"{digest}-{image_size}px-uint8-{_converter_version()}.tflite")


def _verification_path(artifact: str) -> str:
    return artifact + ".verified.json"


def planned_engine(requested: str, model_name: str, bfloat16: bool) -> str:
    """What `requested` means for this model before anything is loaded: the registry's choice under auto."""
    if requested == "auto":
        registry = MODELS.get(model_name)
        preferred = registry.preferred_engine if registry else "tensorflow"
        return "tensorflow" if bfloat16 else preferred
    return requested


def verified_artifact(embed: EmbedConfig, fingerprint: str, cache: str) -> Optional[EmbedConfig]:
    """The LiteRT config when an earlier job compiled this model and verified it against TensorFlow.

    Then the launcher needs no TensorFlow at all: a later run starts in a fraction of the time.
    """
    path = compiled_path(cache, fingerprint, embed.image_size)
    try:
        verified = json.loads(read_bytes(_verification_path(path)).decode("utf-8"))
    except Exception:  # not compiled yet, or never verified
        return None
    if verified.get("relative_difference", 1.0) > RELATIVE_TOLERANCE or not FileSystems.exists(path):
        return None
    return dataclasses.replace(embed, engine="litert", compiled=path)


def _record_verification(path: str, difference: float) -> None:
    write_bytes(_verification_path(path), json.dumps({"relative_difference": difference, "tolerance": RELATIVE_TOLERANCE,
                                                      "probe_images": PROBE_IMAGES}).encode("utf-8"))


def compile_litert(reference: HubEmbedder, image_size: int, fingerprint: str, cache: str) -> str:
    """The LiteRT artifact of the loaded TensorFlow model, converted now or reused from the cache."""
    path = compiled_path(cache, fingerprint, image_size)
    if FileSystems.exists(path):
        return path
    if not FileSystems.exists(cache):
        FileSystems.mkdirs(cache)
    write_bytes(path, reference.to_litert())
    return path


PROBE_IMAGES = 4


def probe_images(image_size: int, count: int = PROBE_IMAGES) -> np.ndarray:
    """Deterministic test pictures: smooth gradients with texture, so that the vectors differ between them."""
    rng = np.random.default_rng(7)
    axis = np.linspace(0, 1, image_size, dtype=np.float32)
    images = []
    for i in range(count):
        base = np.stack([np.outer(axis, np.ones_like(axis)) * (i + 1) % 1, np.outer(np.ones_like(axis), axis),
                         np.full((image_size, image_size), i / count, np.float32)], axis=-1)
        noise = rng.normal(0, 0.05, base.shape).astype(np.float32)
        images.append(np.clip((base + noise) * 255, 0, 255).astype(np.uint8))
    return np.stack(images)


def fidelity(compiled: EmbedConfig, reference: HubEmbedder) -> float:
    """Max abs difference between the engines' vectors on the probe images, relative to their largest norm."""
    pixels = probe_images(compiled.image_size)
    expected = reference(pixels)
    produced = load_embedder(compiled)(pixels)
    return float(np.abs(produced - expected).max() / max(np.linalg.norm(expected, axis=1).max(), 1e-12))


def describe(config: EmbedConfig) -> str:
    """The engine as recorded in the Parquet metadata and the run report."""
    from importlib.metadata import version

    if config.engine == "litert":
        return f"litert (ai-edge-litert {version('ai-edge-litert')}, XNNPACK; converted by {_converter_version()})"
    return f"tensorflow {version('tensorflow')}"


def refuse_incompatible(requested: str, bfloat16: bool) -> None:
    """Checked before any compiled model is looked up: what a run records must be what it ran."""
    if bfloat16 and requested == "litert":
        raise EngineError("--bfloat16 is a TensorFlow (oneDNN) mode and does not apply to --engine litert; "
                          "drop one of the two.")


def resolve_engine(embed: EmbedConfig, requested: str, model_name: str, fingerprint: str, cache: str,
                   reference: Callable[[], HubEmbedder]) -> tuple[EmbedConfig, Optional[str]]:
    """The EmbedConfig with the engine to use, and a one-line note when `auto` had to choose otherwise.

    `reference` gives the model loaded in TensorFlow (loaded once by the launcher's check): LiteRT's
    artifact is converted from it and compared with it.
    """
    if requested not in ENGINES:
        raise EngineError(f"--engine {requested} is not one of {', '.join(ENGINES)}.")
    if planned_engine(requested, model_name, bfloat16=False) == "tensorflow":
        return dataclasses.replace(embed, engine="tensorflow", compiled=None), None
    refuse_incompatible(requested, embed.bfloat16)
    if embed.bfloat16:
        return dataclasses.replace(embed, engine="tensorflow"), "note: --bfloat16 runs on TensorFlow, not LiteRT."
    try:
        path = compile_litert(reference(), embed.image_size, fingerprint, cache)
        compiled = dataclasses.replace(embed, engine="litert", compiled=path)
        difference = fidelity(compiled, reference())
        _record_verification(path, difference)
    except Exception as exc:
        problem = f"the model could not be converted for LiteRT ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    else:
        if difference <= RELATIVE_TOLERANCE:
            return compiled, None
        problem = (f"LiteRT's vectors differ from TensorFlow's by {difference:.1e} of their norm, more than "
                   f"{RELATIVE_TOLERANCE:g}")
    if requested == "litert":
        raise EngineError(f"--engine litert: {problem}. Use --engine tensorflow.")
    return dataclasses.replace(embed, engine="tensorflow", compiled=None), f"note: {problem}; using TensorFlow."
