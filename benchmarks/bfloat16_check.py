"""The opt-in --bfloat16 mode: speed-up over float32 and how close its vectors stay, on real photos.

    .venv/bin/python benchmarks/bfloat16_check.py [--model mobilenet_v2_130_224] [--images 128]

Each precision runs in its own process (the oneDNN option is process-wide). Writes benchmarks/results/MODEL-bfloat16.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)


def embed_in_this_process(handle, size, dim, bfloat16, corpus_dir, count, out_path):
    from run_benchmark import batch_for, build_corpus

    from transforms.decode import PreprocessConfig, decode_image
    from transforms.embed import EmbedConfig, HubEmbedder

    config = PreprocessConfig(image_size=size)
    pixels = []
    for path in build_corpus(corpus_dir, count):
        with open(path, "rb") as f:
            pixels.append(decode_image(f.read(), config))
    pixels = np.stack(pixels)
    batch = batch_for(size)
    embedder = HubEmbedder(EmbedConfig(handle=handle, image_size=size, dim=dim, batch_size=batch, bfloat16=bfloat16))
    embedder(pixels[:batch])  # trace and warm up
    start = time.perf_counter()
    vectors = np.concatenate([embedder(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    rate = len(pixels) / (time.perf_counter() - start)
    np.save(out_path, vectors)
    print(json.dumps({"images_per_s": rate}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilenet_v2_130_224")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--child", choices=["float32", "bfloat16"])
    parser.add_argument("--out")
    args = parser.parse_args()

    from pipeline.models import MODELS
    from pipeline.standin_models import cached_standin, load_calibration_images

    spec = MODELS[args.model]
    handle = cached_standin(spec, os.path.join(REPO, ".cache", "standins"),
                            load_calibration_images(os.path.join(REPO, "samples", "*"), spec))
    corpus = os.path.join(HERE, "results", "corpus")
    if args.child:
        embed_in_this_process(handle, spec.input_size, spec.dim, args.child == "bfloat16", corpus, args.images,
                              args.out)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("float32", "bfloat16"):
            out = os.path.join(tmp, f"{precision}.npy")
            line = subprocess.run([sys.executable, __file__, "--model", args.model, "--images", str(args.images),
                                   "--child", precision, "--out", out], check=True, capture_output=True,
                                  text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}).stdout.strip()
            results[precision] = {"images_per_s": round(json.loads(line.splitlines()[-1])["images_per_s"], 2),
                                  "vectors": np.load(out)}
    a, b = results["float32"].pop("vectors"), results["bfloat16"].pop("vectors")
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    nearest = np.argmin(np.linalg.norm(b[:, None] - a[None], axis=-1), axis=1)
    report = {
        "model": spec.name, "images": len(a), **results,
        "speedup": round(results["bfloat16"]["images_per_s"] / results["float32"]["images_per_s"], 3),
        "cosine_to_float32": {"min": round(float(cosine.min()), 5), "mean": round(float(cosine.mean()), 5)},
        "nearest_float32_vector_is_own": float((nearest == np.arange(len(a))).mean()),
        "cpu_flags_bf16": "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open("/proc/cpuinfo").read(),
    }
    with open(os.path.join(HERE, "results", f"{spec.name}-bfloat16.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
