"""The baseline: the same job written the way Beam's RunInference examples do it.

A PIL decode DoFn producing float32 arrays, Beam's stock TFModelHandlerNumpy (which needs legacy Keras for a hub
SavedModel, so TF_USE_LEGACY_KERAS=1 is set before TensorFlow is imported), and WriteToParquet of row dicts.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference  # noqa: E402
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402


def read_and_preprocess(row, size):
    from PIL import Image

    with FileSystems.open(row["uri"]) as f:
        image = Image.open(io.BytesIO(f.read())).convert("RGB").resize((size, size))
    return row["id"], np.asarray(image, dtype=np.float32) / 255.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--handle", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    args, beam_args = parser.parse_known_args()
    with open(args.manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), args.dim))])
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        _ = (
            p
            | beam.Create(rows)
            | beam.Map(read_and_preprocess, args.size)
            | RunInference(KeyedModelHandler(TFModelHandlerNumpy(args.handle)))
            | beam.MapTuple(lambda id_, result: {"id": id_, "embedding": result.inference.numpy()})
            | beam.io.WriteToParquet(os.path.join(args.output, "embeddings"), schema, file_name_suffix=".parquet")
        )


if __name__ == "__main__":
    main()
