"""Decoders and resizers side by side on the benchmark corpus: speed on one core, and the pixels and vectors they
give against the pipeline's recipe (Pillow with JPEG DCT scaling, bicubic antialiased resize).

    .venv/bin/pip install opencv-python-headless simplejpeg   # measured only: not dependencies of the project
    .venv/bin/python benchmarks/decoders.py [--images 300]

Each candidate decodes and resizes every corpus JPEG to 224x224 RGB uint8. "pixels" is the mean and max
absolute difference to the recipe's pixels; "vectors" compares the stand-in MobileNet's vectors of the
candidate's pixels with those of the recipe's: max difference relative to the norm, and the share of images
whose nearest recipe vector is their own. Writes benchmarks/results/decoders.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from run_benchmark import build_corpus  # noqa: E402

from pipeline.engine import compile_litert, default_cache  # noqa: E402
from pipeline.fingerprint import model_fingerprint  # noqa: E402
from pipeline.models import MODELS  # noqa: E402
from pipeline.standin_models import cached_standin, load_calibration_images  # noqa: E402
from transforms.decode import PreprocessConfig, decode_image  # noqa: E402
from transforms.embed import EmbedConfig, HubEmbedder  # noqa: E402
from transforms.litert_engine import LiteRTEmbedder  # noqa: E402

SIZE = MODELS["mobilenet_v2_130_224"].input_size


def recipe(data: bytes) -> np.ndarray:
    return decode_image(data, PreprocessConfig(image_size=SIZE))


def pillow_without_draft(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def pillow_reducing_gap(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (SIZE, SIZE))
        return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC, reducing_gap=2.0))


def opencv_reduced_area(data: bytes) -> np.ndarray:
    import cv2

    array = np.frombuffer(data, np.uint8)
    header = cv2.imdecode(array, cv2.IMREAD_REDUCED_COLOR_8)  # cheapest look at the size
    scale = max(1, min(8, min(header.shape[0] * 8 // SIZE, header.shape[1] * 8 // SIZE)))
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[max(s for s in (1, 2, 4, 8) if s <= scale)]
    image = cv2.imdecode(array, flag)
    return cv2.cvtColor(cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def simplejpeg_then_pillow(data: bytes) -> np.ndarray:
    import simplejpeg
    from PIL import Image

    image = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=SIZE, min_width=SIZE)
    return np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


CANDIDATES = {
    "pillow draft + bicubic (the recipe)": recipe,
    "pillow, no draft, bicubic": pillow_without_draft,
    "pillow draft + bicubic, reducing_gap=2": pillow_reducing_gap,
    "opencv reduced decode + INTER_AREA": opencv_reduced_area,
    "simplejpeg (min size) + pillow bicubic": simplejpeg_then_pillow,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    paths = build_corpus(os.path.join(HERE, "results", "corpus"), args.images)
    blobs = [open(p, "rb").read() for p in paths]
    spec = MODELS["mobilenet_v2_130_224"]
    handle = cached_standin(spec, os.path.join(REPO, ".cache", "standins"),
                            load_calibration_images(os.path.join(REPO, "samples", "*"), spec))
    reference = HubEmbedder(EmbedConfig(handle=handle, image_size=SIZE, dim=spec.dim))
    embedder = LiteRTEmbedder(compile_litert(reference, SIZE, model_fingerprint(handle), default_cache(None)), SIZE,
                              spec.dim, threads=1)
    reference = np.stack([recipe(b) for b in blobs])
    reference_vectors = np.concatenate([embedder(reference[i:i + 32]) for i in range(0, len(reference), 32)])
    results = []
    for name, decode in CANDIDATES.items():
        try:
            decode(blobs[0])
        except ImportError as exc:
            print(f"{name:42s} not installed ({exc.name})")
            results.append({"candidate": name, "installed": False})
            continue
        start = time.perf_counter()
        pixels = np.stack([decode(b) for b in blobs])
        rate = len(blobs) / (time.perf_counter() - start)
        vectors = np.concatenate([embedder(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
        difference = np.abs(pixels.astype(np.int16) - reference)
        relative = float(np.abs(vectors - reference_vectors).max() / np.linalg.norm(reference_vectors, axis=1).max())
        distances = np.linalg.norm(vectors[:, None] - reference_vectors[None], axis=-1)
        own = float(np.mean(np.argmin(distances, axis=1) == np.arange(len(vectors))))
        row = {"candidate": name, "installed": True, "images_per_s": round(rate, 1),
               "pixels_mean_abs_diff": round(float(difference.mean()), 3), "pixels_max_abs_diff": int(difference.max()),
               "vectors_max_relative_diff": round(relative, 5), "nearest_is_own_share": round(own, 3)}
        results.append(row)
        print(f"{name:42s} {rate:7.1f} img/s  pixels mean/max diff {row['pixels_mean_abs_diff']:6.3f} / "
              f"{row['pixels_max_abs_diff']:3d}  vectors max rel diff {relative:.4f}, own nearest {own:.3f}",
              flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "decoders.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
