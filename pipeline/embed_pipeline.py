"""The pipeline's shape: source -> decode/resize -> embed -> Parquet, with every failure kept."""

from __future__ import annotations

from typing import Mapping

import apache_beam as beam

from pipeline.options import JobConfig
from transforms.decode import DecodeImages
from transforms.embed import EmbedImages
from transforms.progress import ReportProgress
from transforms.records import FAILED
from transforms.sink import EMBEDDINGS_PREFIX, WriteEmbeddings, WriteErrors, output_files_pattern
from transforms.source import ReadImageRefs


def build_pipeline(p: beam.Pipeline, config: JobConfig, metadata: Mapping[str, str]) -> None:
    """Adds the embedding job to `p`. Every input ends in exactly one of the two outputs."""
    previous = None
    if config.skip_existing and not config.force_full_run:
        previous = output_files_pattern(config.skip_existing, EMBEDDINGS_PREFIX)
    inputs = p | "ReadInputs" >> ReadImageRefs(config.input, previous, config.tfrecord_features)
    decoded = inputs["refs"] | "Decode" >> DecodeImages(config.preprocess, config.read, config.decode_threads)
    embedded = decoded.decoded | "Embed" >> EmbedImages(config.embed)
    _ = (
        embedded.embeddings
        | "Progress" >> beam.ParDo(ReportProgress(config.progress_interval_s))
        | "WriteEmbeddings" >> WriteEmbeddings(config.output_dir, config.model.dim, metadata)
    )
    _ = (
        (inputs[FAILED], decoded[FAILED], embedded[FAILED])
        | "AllFailures" >> beam.Flatten()
        | "WriteErrors" >> WriteErrors(config.output_dir)
    )
