"""One engine alone in a fresh process, through the pipeline's own embedder classes (prints one JSON line):
start-up (imports, model load, first batch), images/s on ready uint8 batches, peak RSS, whether TF was imported.

Run by engines.py; several copies at once (aligned by --start_at) measure a multi-process setting.
"""

import argparse
import json
import os
import sys
import time

started = time.perf_counter()
parser = argparse.ArgumentParser()
parser.add_argument("--engine", choices=("tensorflow", "litert"), required=True)
parser.add_argument("--handle", required=True)
parser.add_argument("--compiled")
parser.add_argument("--size", type=int, required=True)
parser.add_argument("--dim", type=int, required=True)
parser.add_argument("--batch", type=int, required=True)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--seconds", type=float, default=8.0)
parser.add_argument("--start_at", type=float, default=0.0, help="wall-clock time to start measuring (aligns copies)")
args = parser.parse_args()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from transforms.embed import EmbedConfig, load_embedder  # noqa: E402

config = EmbedConfig(handle=args.handle, image_size=args.size, dim=args.dim, engine=args.engine,
                     compiled=args.compiled, intra_op_threads=args.threads, inter_op_threads=1)
embedder = load_embedder(config)
batch = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
embedder(batch)
startup = time.perf_counter() - started
embedder(batch)
time.sleep(max(0.0, args.start_at - time.time()))
images, start = 0, time.perf_counter()
while time.perf_counter() - start < args.seconds:
    embedder(batch)
    images += args.batch
with open("/proc/self/status") as status:  # VmHWM restarts at exec, unlike ru_maxrss (inherited from the parent)
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"images_per_s": images / (time.perf_counter() - start), "startup_s": startup,
                  "peak_rss_mb": peak_kb / 1024,
                  "tensorflow_imported": "tensorflow" in sys.modules}))
