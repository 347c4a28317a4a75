"""The pipeline's shape: source -> decode/resize -> embed -> Parquet -> done marker, with every failure kept."""

from __future__ import annotations

import uuid
from typing import Mapping, Optional

import apache_beam as beam

from pipeline.options import JobConfig
from transforms.images_to_embeddings import ImagesToEmbeddings
from transforms.progress import CountDone
from transforms.records import FAILED
from transforms.sink import EMBEDDINGS_PREFIX, MarkFinished, WriteEmbeddings, WriteErrors, output_files_pattern
from transforms.source import SKIPPED, ReadImageRefs


def build_pipeline(
    p: beam.Pipeline, config: JobConfig, metadata: Mapping[str, str], progress_dir: Optional[str] = None
) -> None:
    """Adds the embedding job to `p`. Every input ends in exactly one of the two outputs.

    Finished inputs are counted for progress (unless --progress_interval 0): into `progress_dir` when
    the launcher can read the workers' files, as log lines on the workers otherwise.
    """
    previous = []
    if not config.force_full_run:
        previous = [output_files_pattern(folder, EMBEDDINGS_PREFIX) for folder in config.skip_existing]
    inputs = p | "ReadInputs" >> ReadImageRefs(config.input, previous, config.tfrecord_features, config.read.max_bytes)
    embedded = inputs["refs"] | "ImagesToEmbeddings" >> ImagesToEmbeddings(
        config.embed, config.preprocess, config.read, config.decode_threads)
    failures = (inputs[FAILED], embedded.failures) | "AllFailures" >> beam.Flatten()
    embeddings = embedded.embeddings
    if config.progress_interval_s > 0:
        run_id = uuid.uuid4().hex  # fixed when the pipeline is built, so every worker shares it
        embeddings = embeddings | "CountEmbedded" >> beam.ParDo(CountDone(run_id, progress_dir, config.progress_interval_s))
        failures = failures | "CountFailed" >> beam.ParDo(CountDone(run_id, progress_dir, config.progress_interval_s))
        _ = inputs[SKIPPED] | "CountSkipped" >> beam.ParDo(CountDone(run_id, progress_dir, config.progress_interval_s))
    written = (
        embeddings | "WriteEmbeddings" >> WriteEmbeddings(config.output_dir, config.model.dim, metadata),
        failures | "WriteErrors" >> WriteErrors(config.output_dir),
    ) | "WrittenFiles" >> beam.Flatten()
    _ = {"files": written, "embedded": embeddings, "errors": failures, "skipped_existing": inputs[SKIPPED]} \
        | "MarkFinished" >> MarkFinished(config.output_dir)
