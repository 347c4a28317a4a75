"""The model alone: images/s of one process on ready float32 batches (prints one JSON line).

Run by run_benchmark.py, once per thread/batch setting, several copies at once for multi-process settings.
"""

import argparse
import json
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--handle", required=True)
parser.add_argument("--size", type=int, required=True)
parser.add_argument("--batch", type=int, required=True)
parser.add_argument("--intra", type=int, required=True)
parser.add_argument("--seconds", type=float, default=10.0)
parser.add_argument("--start_at", type=float, default=0.0, help="wall-clock time to start measuring (aligns copies)")
args = parser.parse_args()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_hub as hub  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(args.intra)
tf.config.threading.set_inter_op_parallelism_threads(1)
model = hub.load(args.handle)
call = tf.function(model.__call__, input_signature=[tf.TensorSpec([None, args.size, args.size, 3], tf.float32)])
batch = tf.constant(np.random.default_rng(0).random((args.batch, args.size, args.size, 3), dtype=np.float32))
call(batch).numpy()  # trace and warm up
call(batch).numpy()
time.sleep(max(0.0, args.start_at - time.time()))
images, start = 0, time.perf_counter()
while time.perf_counter() - start < args.seconds:
    call(batch).numpy()
    images += args.batch
print(json.dumps({"images_per_s": images / (time.perf_counter() - start)}))
