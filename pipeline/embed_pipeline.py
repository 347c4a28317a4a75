"""The pipeline's shape: source -> decode/resize -> embed -> Parquet, with every failure kept."""

from __future__ import annotations

from typing import Mapping

import apache_beam as beam

from pipeline.options import JobConfig
from transforms.decode import DecodeImages
from transforms.embed import EmbedImages
from transforms.records import FAILED
from transforms.sink import WriteEmbeddings, WriteErrors
from transforms.source import ReadImageRefs


def build_pipeline(p: beam.Pipeline, config: JobConfig, metadata: Mapping[str, str]) -> None:
    """Adds the embedding job to `p`. Every input ends in exactly one of the two outputs."""
    inputs = p | "ReadInputs" >> ReadImageRefs(config.input)
    decoded = inputs["refs"] | "Decode" >> DecodeImages(config.preprocess, config.read)
    embedded = decoded.decoded | "Embed" >> EmbedImages(config.embed)
    _ = embedded.embeddings | "WriteEmbeddings" >> WriteEmbeddings(config.output_dir, config.model.dim, metadata)
    _ = (
        (inputs[FAILED], decoded[FAILED], embedded[FAILED])
        | "AllFailures" >> beam.Flatten()
        | "WriteErrors" >> WriteErrors(config.output_dir)
    )
