"""Entry point: python -m pipeline.run --input MANIFEST_OR_GLOB --output OUT_DIR [options] [Beam options].

Everything that can be checked before workers start is checked here (options, manifest header,
output directory, model handle and its output dim), so a mistake costs seconds, not a job.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.embed_pipeline import build_pipeline
from pipeline.models import handle_available
from pipeline.options import JobConfig, parse_args
from pipeline.outputs import OutputDirError, OutputSummary, prepare_output_dir, summarize_outputs
from pipeline.standin_models import STANDIN_WARNING, standin_info
from transforms.embed import EmbedConfig, HubEmbedder
from transforms.source import ManifestError, check_manifest, input_kind


class ModelCheckError(RuntimeError):
    """The model handle cannot be loaded, or its output does not match the declared dim."""


@functools.lru_cache(maxsize=2)
def check_model(config: EmbedConfig) -> None:
    """Loads the model once in the launcher and embeds one grey image: [1, dim] or a clear error."""
    handle = config.handle
    if not handle_available(handle):
        raise ModelCheckError(
            f"Cannot reach the host of model handle {handle} (and it is not in TFHUB_CACHE_DIR). "
            f"Use a reachable handle, a gs:// copy or a local SavedModel directory (--model_handle)."
        )
    try:
        embedder = HubEmbedder(config)
        embedder(np.full((1, config.image_size, config.image_size, 3), 128, np.uint8))
    except Exception as exc:
        message = " ".join(str(exc).split())[:500]
        raise ModelCheckError(f"Model handle {handle} is not a usable feature-vector model: {message}") from None


def output_metadata(config: JobConfig) -> dict[str, str]:
    """The Parquet key/value metadata: what produced these vectors, enough to refuse mixing runs."""
    standin = standin_info(config.model.handle)
    return {
        "model": config.model.name,
        "handle": config.model.handle,
        "image_size": str(config.model.input_size),
        "dim": str(config.model.dim),
        "preprocessing": config.preprocess.describe(),
        "weights": f"STAND-IN: {STANDIN_WARNING}" if standin else "as published at the handle",
    }


def print_summary(config: JobConfig, summary: OutputSummary) -> None:
    out = sys.stdout
    if summary.embedded + summary.errors == 0:
        print(f"No inputs: --input {config.input} has no rows or matches no files; the outputs are empty.", file=out)
    print(f"Embedded {summary.embedded} images ({config.model.name}, dim {summary.dim}) into "
          f"{config.output_dir}/embeddings-*.parquet", file=out)
    if summary.errors:
        stages = ", ".join(f"{stage} {count}" for stage, count in sorted(summary.errors_by_stage.items()))
        print(f"{summary.errors} inputs not embedded ({stages}): see {config.output_dir}/errors-*.parquet", file=out)
    else:
        print("No errors.", file=out)
    if summary.metadata.get("weights", "").startswith("STAND-IN"):
        print(f"WARNING: {STANDIN_WARNING}.", file=out)


def run(config: JobConfig, beam_args: Sequence[str]) -> OutputSummary:
    """Checks, runs and summarises one job; raises on anything that makes the run unusable."""
    if input_kind(config.input) == "manifest":
        check_manifest(config.input)
    prepare_output_dir(config.output_dir, config.overwrite)
    check_model(config.embed)
    options = PipelineOptions(list(beam_args))
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, config, output_metadata(config))
    return summarize_outputs(config.output_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config, beam_args = parse_args(argv)
    try:
        summary = run(config, beam_args)
    except (ManifestError, OutputDirError, ModelCheckError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(config, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
