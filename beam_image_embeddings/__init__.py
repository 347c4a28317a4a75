"""The library face of beam-image-embeddings: the names a Beam pipeline of your own imports.

    import apache_beam as beam
    from beam_image_embeddings import ImagesToEmbeddings, model_config

    with beam.Pipeline() as p:
        results = p | beam.Create(["gs://bucket/cat.jpg"]) | ImagesToEmbeddings(model_config("mobilenet_v2_130_224"))
        results.embeddings | beam.Map(lambda e: (e.id, e.vector.tolist())) | beam.io.WriteToText("vectors")
        results.failures | beam.Map(lambda f: f"{f.id}: {f.error}") | "Failures" >> beam.io.WriteToText("failures")

Everything here is public and kept stable; the `pipeline` and `transforms` packages are the commands' internals.
Nothing imports TensorFlow until a worker loads the model.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.models import MODELS, ModelConfigError, ModelSpec, resolve_model
from transforms.decode import ImageDecodeError, PreprocessConfig, decode_image
from transforms.embed import EmbedConfig, Embedding, EmbeddingModelHandler
from transforms.images_to_embeddings import EmbeddingResults, ImagesToEmbeddings
from transforms.records import Failure, ImageRef, Stage
from transforms.uri_reader import ReadConfig

__all__ = [
    "MODELS", "EmbedConfig", "Embedding", "EmbeddingModelHandler", "EmbeddingResults", "Failure", "ImageDecodeError",
    "ImageRef", "ImagesToEmbeddings", "ModelConfigError", "ModelSpec", "PreprocessConfig", "ReadConfig", "Stage",
    "image_pixels", "model_config",
]


def model_config(
    model: str = "mobilenet_v2_130_224",
    *,
    handle: Optional[str] = None,
    image_size: Optional[int] = None,
    dim: Optional[int] = None,
    batch_size: int = 32,
    large_model: bool = False,
    compiled_litert: Optional[str] = None,
) -> EmbedConfig:
    """The embedding model for ImagesToEmbeddings and EmbeddingModelHandler, from the registry (MODELS).

    `handle` loads the same model from elsewhere (a gs:// mirror, a local SavedModel folder; TFHUB_CACHE_DIR
    is honoured); `model="custom"` takes any TF2 feature-vector SavedModel with `handle`, `image_size` and `dim`.
    `compiled_litert` runs a .tflite that `image-embeddings run --engine litert` compiled and verified for
    this model (in its compiled-models cache) instead of TensorFlow. Raises ModelConfigError, saying what to
    change, for options that contradict the registry.
    """
    spec = resolve_model(model, handle, image_size, dim)
    return EmbedConfig(
        handle=spec.handle, image_size=spec.input_size, dim=spec.dim, batch_size=batch_size, large_model=large_model,
        engine="litert" if compiled_litert else "tensorflow", compiled=compiled_litert,
    )


def image_pixels(data: bytes, model: EmbedConfig, preprocess: Optional[PreprocessConfig] = None) -> np.ndarray:
    """Encoded image bytes -> the uint8 [size, size, 3] pixels EmbeddingModelHandler takes, by the pipeline's
    one preprocessing definition. Raises ImageDecodeError saying why bytes are not an image it embeds."""
    return decode_image(data, preprocess or PreprocessConfig(image_size=model.image_size))
