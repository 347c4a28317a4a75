"""A test model whose vectors reflect what an image looks like: a small, mean-centred thumbnail of it.

Random-weight stand-ins cannot tell a copy of an image from another image, so similarity tests use this
instead: a SavedModel with the hub call convention (float32 [batch, size, size, 3] in [0, 1] -> float32
[batch, dim]) that averages the image down to grid x grid x 3 and subtracts the mean, so that cosine
similarity compares layouts of colour and light, not overall brightness.
"""

from __future__ import annotations

import os


def build_thumbnail_model(export_dir: str, image_size: int = 64, grid: int = 8) -> str:
    """Saves the model to `export_dir` (reused when present); returns it. Its dim is grid * grid * 3."""
    if os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        return export_dir
    from transforms.embed import import_tensorflow

    tf = import_tensorflow()
    cell = image_size // grid

    class Thumbnail(tf.Module):
        variables = trainable_variables = regularization_losses = ()

        @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)])
        def __call__(self, images):
            small = tf.nn.avg_pool2d(images, cell, cell, "VALID")
            flat = tf.reshape(small, [-1, grid * grid * 3])
            return flat - tf.reduce_mean(flat, axis=1, keepdims=True)

    tf.saved_model.save(Thumbnail(), export_dir)
    return export_dir
