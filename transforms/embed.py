"""Embed: batched inference through Beam's RunInference with model handlers of our own.

RunInference keeps one loaded model per worker process (Beam's `Shared` handle), batches the
elements and records latency and batch-size metrics. The handler loads with `hub.load`, which works
under Keras 3, unlike Beam's stock TF handler (it calls `tf.keras.models.load_model`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from transforms.model_contract import (  # noqa: F401 (VERBOSE_ENV and the errors are part of this module's face)
    VERBOSE_ENV,
    ModelEnvironmentError,
    ModelOutputError,
    check_output,
    native_stderr_muted,
)
from transforms.records import FAILED, DecodedImage, Failure, Stage, describe_exception, retry_out_of_memory


def import_tensorflow():
    """TensorFlow, imported without its start-up chatter (see native_stderr_muted)."""
    if "tensorflow" not in sys.modules and not os.environ.get(VERBOSE_ENV):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_stderr_muted():
        import tensorflow as tf
    return tf


class Embedding(NamedTuple):
    id: str
    uri: str
    vector: np.ndarray  # float32 [dim]
    sha256: Optional[str] = None  # of the encoded bytes


# TensorFlow errors that say nothing about the images (tf.errors class names).
_ENVIRONMENT_ERRORS = ("ResourceExhaustedError", "InternalError", "UnavailableError", "AbortedError", "DataLossError")

@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    handle: str
    image_size: int
    dim: int
    batch_size: int = 32
    intra_op_threads: int = 0  # 0: TensorFlow's default
    inter_op_threads: int = 0
    large_model: bool = False  # one model per machine, shared by its worker processes
    bfloat16: bool = False  # oneDNN auto mixed precision; opt-in, changes the vectors slightly
    engine: str = "tensorflow"  # or "litert": the compiled artifact at `compiled`, chosen by the launcher
    compiled: Optional[str] = None

    def precision(self) -> str:
        return "bfloat16 (oneDNN auto mixed precision)" if self.bfloat16 else "float32"


def load_embedder(config: EmbedConfig):
    """The engine the launcher chose: LiteRT on the compiled artifact (no TensorFlow import), or TensorFlow."""
    if config.engine == "litert":
        from transforms.litert_engine import LiteRTEmbedder

        return LiteRTEmbedder(config.compiled, config.image_size, config.dim, config.intra_op_threads)
    return HubEmbedder(config)


class HubEmbedder:
    """A loaded hub feature-vector model that takes uint8 pixels and returns float32 vectors.

    The uint8 -> float32 [0, 1] conversion is part of the traced graph: pixels stay compact until the
    model needs them.
    """

    def __init__(self, config: EmbedConfig):
        tf = import_tensorflow()
        import tensorflow_hub as hub

        _configure_threads(tf, config.intra_op_threads, config.inter_op_threads)
        if config.bfloat16:  # process-wide; takes effect for graphs traced after it
            tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
        self._dim = config.dim
        with native_stderr_muted():  # the first device lookup prints "failed call to cuInit" on CPU machines
            self._module = hub.load(config.handle)
        module = self._module

        @tf.function(input_signature=[tf.TensorSpec([None, config.image_size, config.image_size, 3], tf.uint8)])
        def embed(pixels):
            return module(tf.cast(pixels, tf.float32) / 255.0)

        self._embed = embed
        self._environment_errors = tuple(getattr(tf.errors, name) for name in _ENVIRONMENT_ERRORS)

    def to_litert(self) -> bytes:
        """The traced uint8 call (cast to [0, 1] included) converted to a LiteRT flatbuffer."""
        tf = import_tensorflow()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([self._embed.get_concrete_function()], self._module)
        return converter.convert()

    def accepted_input_sizes(self) -> set:
        """(height, width) pairs the model's traced call signatures accept; None means any. Empty: unknown."""
        sizes = set()
        for function in getattr(getattr(self._module, "__call__", None), "concrete_functions", ()):
            args, _ = function.structured_input_signature
            shape = getattr(args[0], "shape", None) if args else None
            if shape is not None and shape.rank == 4:
                sizes.add((shape[1], shape[2]))
        return sizes

    def output_dim(self, side: int) -> int:
        """The length of the vector the model returns for one grey side x side image (whatever dim was declared)."""
        tf = import_tensorflow()
        return int(self._module(tf.fill([1, side, side, 3], 0.5)).shape[-1])

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [h, w, 3] images (a sequence, or an [n, h, w, 3] array) -> float32 [n, dim]."""
        pixels = np.stack(images) if not isinstance(images, np.ndarray) else images
        try:
            vectors = self._embed(pixels).numpy()
        except self._environment_errors as exc:
            raise ModelEnvironmentError(describe_exception(exc)) from exc
        check_output(vectors, len(pixels), self._dim, "The model")
        return vectors


def _configure_threads(tf, intra: int, inter: int) -> None:
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TF already initialised in this process (e.g. by the launcher's model check)
        logging.info("TensorFlow thread settings already fixed in this process; keeping them.")


class EmbeddingModelHandler(ModelHandler[np.ndarray, PredictionResult, object]):
    """Beam `ModelHandler` for `RunInference`: uint8 RGB pixels [size, size, 3] -> `PredictionResult`.

    The contract, as Beam's own handlers have it: `run_inference` returns one `PredictionResult(example,
    inference, model_id)` per element, in order, where `inference` is the float32 [dim] vector and `model_id`
    the model's handle. A batch that cannot be embedded raises (a wrong shape or dtype, a non-finite vector,
    a model that returns the wrong dim): Beam then retries the bundle, or hands the batch to
    `RunInference(...).with_exception_handling()`'s `failed_inferences`. Wrap it in Beam's
    `KeyedModelHandler` for (key, pixels) elements. One loaded engine (TensorFlow, or LiteRT when `config`
    names a compiled artifact) is shared per process, or per machine with `large_model`.
    """

    def __init__(self, config: EmbedConfig):
        super().__init__(
            min_batch_size=config.batch_size, max_batch_size=config.batch_size, large_model=config.large_model
        )
        self._config = config

    def load_model(self):
        model = load_embedder(self._config)
        # The process's modules and model live as long as it does: frozen, full collections skip them
        # instead of re-scanning them while the job runs (see pipeline/runtime.py: collector_frozen).
        gc.freeze()
        return model

    def run_inference(
        self, batch: Sequence[np.ndarray], model, inference_args: Optional[dict] = None
    ) -> Iterable[PredictionResult]:
        side = self._config.image_size
        for position, pixels in enumerate(batch):
            if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != (side, side, 3):
                got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
                raise ValueError(
                    f"Element {position} of the batch is {got}; the model takes uint8 RGB pixels of shape "
                    f"({side}, {side}, 3). Decode and resize the image bytes first (image_pixels)."
                )
        vectors = model(batch)
        bad = [position for position, vector in enumerate(vectors) if not np.isfinite(vector).all()]
        if bad:
            raise ValueError(f"The model returned non-finite values (NaN or infinity) for the images at positions "
                             f"{bad} of the batch.")
        return [PredictionResult(pixels, vector, self._config.handle) for pixels, vector in zip(batch, vectors)]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(pixels.nbytes for pixels in batch)

    def get_metrics_namespace(self) -> str:
        return "embeddings"


class DecodedImagesModelHandler(EmbeddingModelHandler):
    """The pipeline's handler: DecodedImage batches -> an Embedding, or the image's own Failure, per image.

    Unlike the Beam contract above, one bad image does not take its batch down: a failed batch is retried
    image by image and only the images that fail alone become Failures. Errors that are the model's or the
    machine's (ModelOutputError, ModelEnvironmentError) still raise, since no image is to blame.
    """

    def run_inference(
        self, batch: Sequence[DecodedImage], model, inference_args: Optional[dict] = None
    ) -> Iterable[Union[Embedding, Failure]]:
        try:
            vectors = model([image.pixels for image in batch])  # stacked by the engine that needs it
        except (ModelOutputError, ModelEnvironmentError):
            raise
        except Exception:  # MemoryError included: a smaller call may fit
            return [self._embed_alone(image, model) for image in batch]
        return [_finite(image, vector) for image, vector in zip(batch, vectors)]

    @staticmethod
    def _embed_alone(image: DecodedImage, model) -> Union[Embedding, Failure]:
        try:
            return retry_out_of_memory(lambda: _finite(image, model(image.pixels[np.newaxis])[0]),
                                       image, Stage.EMBED, "embedding")
        except (ModelOutputError, ModelEnvironmentError):
            raise
        except Exception as exc:
            return Failure(image.id, image.uri, Stage.EMBED, f"The model failed on this image ({describe_exception(exc)}).")

    def get_num_bytes(self, batch: Sequence[DecodedImage]) -> int:
        return sum(image.pixels.nbytes for image in batch)


def _finite(image: DecodedImage, vector: np.ndarray) -> Union[Embedding, Failure]:
    """The image's Embedding; a vector holding NaN or infinity is that image's failure, since one such vector would
    make pgvector refuse every later publish and poison an ANN index's training."""
    if not np.isfinite(vector).all():
        return Failure(image.id, image.uri, Stage.EMBED, f"The model returned a vector with "
                       f"{int(np.count_nonzero(~np.isfinite(vector)))} non-finite values (NaN or infinity) for "
                       f"this image; it was not written.")
    return Embedding(image.id, image.uri, vector, image.sha256)


def _route(result: Union[Embedding, Failure]):
    if isinstance(result, Failure):
        yield beam.pvalue.TaggedOutput(FAILED, result)
    else:
        yield result


class EmbedImages(beam.PTransform):
    """PCollection[DecodedImage] -> {main: Embedding, FAILED: Failure}."""

    def __init__(self, config: EmbedConfig):
        super().__init__()
        self._handler = DecodedImagesModelHandler(config)

    def expand(self, images):
        return (
            images
            | "RunInference" >> RunInference(self._handler)
            | "Route" >> beam.FlatMap(_route).with_outputs(FAILED, main="embeddings")
        )
