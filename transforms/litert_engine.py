"""The compiled engine: a .tflite conversion of the hub model, run by LiteRT with XNNPACK. No TensorFlow here.

The artifact is converted once per job by the launcher (pipeline/compile.py), with the uint8 -> float32
[0, 1] cast inside the graph, and read by every worker from a location they can all reach.
"""

from __future__ import annotations

import threading

import numpy as np

from transforms.embed import ModelOutputError, native_stderr_muted


class LiteRTEmbedder:
    """uint8 [n, size, size, 3] pixels -> float32 [n, dim] vectors through a LiteRT interpreter.

    An interpreter must not be called from several threads at once, and Dataflow runs many bundle
    threads per SDK process: each calling thread gets its own interpreter, sized to its batch.
    """

    def __init__(self, compiled: str, image_size: int, dim: int, threads: int = 0):
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(compiled, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            self._model = f.read()
        self._size, self._dim = image_size, dim
        self._threads = threads or None  # None: LiteRT's default
        self._local = threading.local()

    def _interpreter(self, batch: int):
        local = self._local
        if getattr(local, "interpreter", None) is None:
            from ai_edge_litert.interpreter import Interpreter

            with native_stderr_muted():
                local.interpreter = Interpreter(model_content=self._model, num_threads=self._threads)
            local.input = local.interpreter.get_input_details()[0]["index"]
            local.output = local.interpreter.get_output_details()[0]["index"]
            local.batch = None
        if local.batch != batch:
            local.interpreter.resize_tensor_input(local.input, [batch, self._size, self._size, 3])
            with native_stderr_muted():
                local.interpreter.allocate_tensors()
            local.batch = batch
        return local

    def accepted_input_sizes(self) -> set:
        return {(self._size, self._size)}

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        local = self._interpreter(len(pixels))
        local.interpreter.set_tensor(local.input, np.ascontiguousarray(pixels, np.uint8))
        local.interpreter.invoke()
        vectors = local.interpreter.get_tensor(local.output).copy()
        if vectors.shape != (len(pixels), self._dim):
            raise ModelOutputError(
                f"The compiled model returned shape {list(vectors.shape)} for {len(pixels)} images; "
                f"expected [{len(pixels)}, {self._dim}] (declared dim {self._dim})."
            )
        return vectors
