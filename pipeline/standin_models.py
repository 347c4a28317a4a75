"""Stand-in SavedModels: the registry's architectures with random weights, shaped like the hub modules.

The real weights live on tfhub.dev / Kaggle. Where those cannot be reached (offline machines, CI) the
project builds a SavedModel of the same Keras architecture and exports it with the hub modules' call
convention, `m(images)` and `m(images, training=False)` on float32 [batch, h, w, 3] in [0, 1], so the
pipeline's real loading code (`hub.load`) runs unchanged. Its vectors are NOT meaningful.

A random-init network collapses (all images map to nearly the same vector), so before export one
training-mode pass with batch-norm momentum 0 over real photos sets the batch-norm statistics; after
that different images give clearly different vectors.

    python -m pipeline.standin_models --model mobilenet_v2_130_224 --output DIR [--calibration_glob 'samples/*']

prints the `--model_handle` to pass: a folder inside DIR (DIR is a cache that holds several).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Sequence

import numpy as np

from pipeline.models import MODELS, ModelSpec, is_remote_hub_handle
from transforms.embed import import_tensorflow

STANDIN_MARKER = "standin.json"
STANDIN_WARNING = "random-weight stand-in model: embeddings are NOT meaningful"
# Bump when the exported graph or calibration changes, so cached stand-ins are rebuilt.
STANDIN_FORMAT_VERSION = 2


def standin_info(handle: str) -> dict | None:
    """The marker a stand-in carries next to its saved_model.pb, or None for a real model."""
    from apache_beam.io.filesystems import FileSystems

    if is_remote_hub_handle(handle):
        return None  # stand-ins are built locally, never served by a hub
    try:
        with FileSystems.open(FileSystems.join(handle, STANDIN_MARKER)) as f:
            return json.loads(f.read().decode("utf8"))
    except Exception:  # any filesystem or parse failure means "no marker"
        return None


def build_standin(spec: ModelSpec, export_dir: str, calibration_images: Sequence[np.ndarray], seed: int = 0) -> str:
    """Builds, calibrates and exports the stand-in for `spec` into `export_dir` (atomically)."""
    if not spec.standin_architecture:
        raise ValueError(f"Model {spec.name} has no stand-in architecture.")
    if len(calibration_images) < 2:
        raise ValueError("Calibrating a stand-in needs at least two images.")
    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    side = spec.input_size if not spec.resizable else None
    network = getattr(keras.applications, spec.standin_architecture)(
        input_shape=(side, side, 3), include_top=False, pooling="avg", weights=None, **dict(spec.standin_kwargs)
    )
    calibration = np.stack([np.asarray(img, np.float32) / 255.0 for img in calibration_images])
    _calibrate_batch_norm(network, calibration * 2.0 - 1.0)

    module = _hub_style_module(network)
    signature = tf.TensorSpec([None, side, side, 3], tf.float32)
    for training in (False, True):
        module.__call__.get_concrete_function(signature, training)
    out = module(tf.constant(calibration)).numpy()
    if out.shape[1] != spec.dim:
        raise RuntimeError(f"Stand-in for {spec.name} outputs {out.shape[1]} dims, registry says {spec.dim}.")

    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".standin-", dir=parent)
    tf.saved_model.save(module, staging)
    with open(os.path.join(staging, STANDIN_MARKER), "w") as f:
        json.dump(
            {
                "standin": True,
                "warning": STANDIN_WARNING,
                "model": spec.name,
                "architecture": spec.standin_architecture,
                "format_version": STANDIN_FORMAT_VERSION,
                "tensorflow": tf.__version__,
            },
            f,
        )
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(staging, export_dir)
    return export_dir


def _calibrate_batch_norm(network, images_in_model_range: np.ndarray) -> None:
    """One training-mode pass with momentum 0: the moving statistics become those of real images."""
    import keras

    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    network(images_in_model_range, training=True)


def _hub_style_module(network):
    """Wraps `network` in a tf.Module (defined here so that TensorFlow is imported only when building)."""
    import tensorflow as tf

    class HubStyleModule(tf.Module):
        """TF Hub reusable-SavedModel face: __call__(images, training), variables, regularization_losses."""

        # Plain attributes shadow tf.Module's computed properties so that they are saved, as in hub modules.
        variables = trainable_variables = regularization_losses = ()

        def __init__(self, network):
            super().__init__()
            self._network = network
            self.variables = list(network.variables)
            self.trainable_variables = list(network.trainable_variables)
            self.regularization_losses = []

        @tf.function
        def __call__(self, images, training=False):
            return self._network(images * 2.0 - 1.0, training=training)

    return HubStyleModule(network)


def cached_standin(spec: ModelSpec, cache_dir: str, calibration_images: Sequence[np.ndarray]) -> str:
    """The stand-in's directory in `cache_dir`, built on first use and reused after."""
    tf = import_tensorflow()

    export_dir = os.path.join(
        cache_dir, f"{spec.name}-{spec.input_size}-v{STANDIN_FORMAT_VERSION}-tf{tf.__version__}"
    )
    if not os.path.isfile(os.path.join(export_dir, STANDIN_MARKER)):
        build_standin(spec, export_dir, calibration_images)
    return export_dir


def load_calibration_images(pattern: str, spec: ModelSpec) -> list[np.ndarray]:
    """Decodes the images matching `pattern` with the pipeline's own preprocessing."""
    from transforms.decode import PreprocessConfig, decode_image

    config = PreprocessConfig(image_size=spec.input_size)
    images = []
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            images.append(decode_image(f.read(), config))
    return images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(m for m in MODELS if MODELS[m].standin_architecture))
    parser.add_argument("--output", required=True, help="Directory for the stand-in SavedModel (a cache: reused).")
    parser.add_argument(
        "--calibration_glob",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "*"),
        help="Real photos that calibrate the batch-norm statistics (default: the shipped samples).",
    )
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    handle = cached_standin(spec, args.output, load_calibration_images(args.calibration_glob, spec))
    print(f"Stand-in for {spec.name} ready ({STANDIN_WARNING}). Use it with:\n"
          f"  python -m pipeline.run --model {spec.name} --model_handle {handle} --input ... --output ...",
          file=sys.stderr)
    print(handle)  # alone on stdout, for scripts


if __name__ == "__main__":
    main()
