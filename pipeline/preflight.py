"""Checks made in the launcher before any work: the model handle, and earlier outputs a run builds on.

Each failure says what is wrong and what to do, so a mistake costs seconds, not a job.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.engine import default_cache, planned_engine
from pipeline.engine import describe as describe_engine
from pipeline.fingerprint import model_fingerprint
from pipeline.models import handle_available
from pipeline.options import JobConfig
from pipeline.outputs import FINISHED_MARKERS, PIPELINE_DONE, RUN_REPORT, is_finished_run, summarize_outputs
from pipeline.standin_models import STANDIN_WARNING, standin_info
from transforms.embed import EmbedConfig, HubEmbedder, ModelOutputError, load_embedder
from transforms.uri_reader import has_glob

# Said wherever a model cannot be had: how to run without a route to the hub.
OFFLINE_HINT = (
    "Without a route to the hub, put the model on disk or gs:// once (docs/running.md: 'Models without a route to the hub') "
    "and pass that directory as --model_handle; or, to try the pipeline with random weights, build a stand-in: "
    "python -m pipeline.standin_models --model MODEL --output .cache/standins (it prints the --model_handle to use)."
)


class ModelCheckError(RuntimeError):
    """The model handle cannot be loaded, does not take the configured input, or its dim differs."""


class IncrementalRunError(ValueError):
    """--skip_existing names an output that cannot be extended by this run."""


class WorkerStorageError(ValueError):
    """A remote runner's workers would look for something where only the launcher has it."""


def check_worker_storage(config: JobConfig, runner: str, compiled_cache: Optional[str], temp_location: Optional[str]):
    """On a remote runner, workers read the model, the inputs, the compiled cache and the outputs themselves.

    The compiled cache's default without --temp_location is the launcher's home, which no worker reads: refused
    before the job starts. Other local paths work only where every worker sees them at the same place (a
    cluster on this machine, a shared mount): returns one warning naming them, or None.
    """
    needs_cache = planned_engine(config.engine, config.model.name, config.embed.bfloat16) == "litert"
    if needs_cache and compiled_cache is None and not temp_location:
        raise WorkerStorageError(
            f"On {runner} the workers load the compiled model from --compiled_cache, which defaults to "
            f"{default_cache(None)} on this machine, where no worker reads it. Pass --temp_location or "
            f"--compiled_cache on storage every worker reads (gs://BUCKET/..., or a mount they all share).")
    paths = {"--input": config.input, "--output": config.output_dir, "--model_handle": config.model.handle,
             **({"--compiled_cache": compiled_cache or default_cache(temp_location)} if needs_cache else {})}
    local = [f"{flag} {path}" for flag, path in paths.items() if "://" not in path]
    if not local:
        return None
    relative = any(not os.path.isabs(path) for path in paths.values() if "://" not in path)
    return (f"WARNING: on {runner} every worker reads these local paths itself: {', '.join(local)}. That works on a "
            f"cluster on this machine or with a mount every worker shares at the same path, not otherwise"
            + ("; and give them as absolute paths: a worker resolves a relative one in its own working directory."
               if relative else "."))


def _saved_model_inside(handle: str) -> Optional[str]:
    """A SavedModel one folder down from `handle` (the stand-in builder's and tar files' layout), if any."""
    if not os.path.isdir(handle) or os.path.isfile(os.path.join(handle, "saved_model.pb")):
        return None
    inner = [os.path.join(handle, d) for d in sorted(os.listdir(handle))
             if os.path.isfile(os.path.join(handle, d, "saved_model.pb"))]
    return inner[0] if len(inner) == 1 else None


def check_handle(handle: str) -> None:
    """What can be said of a handle without loading TensorFlow: reachable, existing, a SavedModel folder."""
    if not handle_available(handle):
        raise ModelCheckError(
            f"Cannot reach the host of model handle {handle} (and it is not in TFHUB_CACHE_DIR). {OFFLINE_HINT}"
        )
    if "://" not in handle and not os.path.exists(handle):
        raise ModelCheckError(f"Model handle {handle} does not exist (no such folder). {OFFLINE_HINT}")
    inner = _saved_model_inside(handle)
    if inner:
        raise ModelCheckError(f"{handle} is a folder that holds a SavedModel, not one itself: pass --model_handle {inner}")
    if os.path.isdir(handle) and not os.path.isfile(os.path.join(handle, "saved_model.pb")):
        raise ModelCheckError(f"{handle} is a folder without saved_model.pb, so it is not a SavedModel. {OFFLINE_HINT}")


def check_compiled(config: EmbedConfig) -> None:
    """A verified compiled model, checked the cheap way: one probe batch through LiteRT gives [n, dim]."""
    try:
        load_embedder(config)(np.full((1, config.image_size, config.image_size, 3), 128, np.uint8))
    except ModelOutputError as exc:
        returned = getattr(exc, "returned", ())
        if len(returned) == 2:
            raise ModelCheckError(f"The model outputs {returned[1]}-dim vectors, not --embedding_dim "
                                  f"{config.dim}: pass --embedding_dim {returned[1]} (the compiled model "
                                  f"{config.compiled} is fine).") from None
        raise ModelCheckError(f"The compiled model {config.compiled} is not usable: {_first_sentence(exc)}. "
                              f"Delete it to compile again, or pass --engine tensorflow.") from None
    except Exception as exc:
        raise ModelCheckError(f"The compiled model {config.compiled} is not usable: {_first_sentence(exc)}. "
                              f"Delete it to compile again, or pass --engine tensorflow.") from None


@functools.lru_cache(maxsize=4)
def check_model(config: EmbedConfig, resizable: bool = True) -> HubEmbedder:
    """Loads the model in TensorFlow once per launcher and embeds one grey image: the loaded model, or a clear error."""
    handle = config.handle
    check_handle(handle)
    try:
        embedder = HubEmbedder(config)
    except Exception as exc:
        raise ModelCheckError(f"Model handle {handle} could not be loaded ({_first_sentence(exc)}). {OFFLINE_HINT}") from None
    sizes = embedder.accepted_input_sizes()
    side = config.image_size
    if sizes and (side, side) not in sizes and (None, None) not in sizes:
        accepted = " or ".join(f"{h or 'any'}x{w or 'any'}" for h, w in sorted(sizes, key=str))
        fixed = sorted(h for h, w in sizes if h and h == w)
        raise ModelCheckError(
            f"The model at {handle} accepts {accepted} images, not {side}x{side}: "
            f"{_what_fits(embedder, fixed[0]) if fixed else 'pass --model custom with its --image_size'}."
        )
    try:
        embedder(np.full((1, side, side, 3), 128, np.uint8))
    except ModelOutputError:
        raise ModelCheckError(f"The model at {handle} is not {config.dim}-dim: {_what_fits(embedder, side)}.") \
            from None
    except Exception as exc:
        raise ModelCheckError(f"Model handle {handle} is not a usable feature-vector model: {_first_sentence(exc)}") from None
    return embedder


def _what_fits(embedder: HubEmbedder, side: int) -> str:
    """Advice that works: the registry model with this input size and the dim the model really returns."""
    from pipeline.models import CUSTOM_MODEL, MODELS

    dim = embedder.output_dim(side)
    custom = f"--model {CUSTOM_MODEL} --image_size {side} --embedding_dim {dim}"
    fitting = [m.name for m in MODELS.values() if m.dim == dim and (m.input_size == side or m.resizable)]
    if fitting:
        return f"it takes {side}x{side} images to {dim}-dim vectors, as {fitting[0]} does: pass --model {fitting[0]}"
    return f"it takes {side}x{side} images to {dim}-dim vectors, as no registry model does: pass {custom}"


def _first_sentence(exc: BaseException) -> str:
    """A TensorFlow error in one readable line: its type and the message's first line, without the graph trace."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else "no details"
    return f"{type(exc).__name__}: {first[:300]}"


def output_metadata(config: JobConfig) -> dict[str, str]:
    """The Parquet key/value metadata: what produced these vectors, enough to refuse mixing runs.

    Call after check_model: the fingerprint reads the model's files.
    """
    standin = standin_info(config.model.handle)
    return {
        "model": config.model.name,
        "handle": config.model.handle,
        "fingerprint": model_fingerprint(config.model.handle),
        "image_size": str(config.model.input_size),
        "dim": str(config.model.dim),
        "preprocessing": config.preprocess.describe(),
        "preprocess": json.dumps(dataclasses.asdict(config.preprocess)),  # the fields, for search queries
        "precision": config.embed.precision(),
        "engine": describe_engine(config.embed),
        "weights": f"STAND-IN: {STANDIN_WARNING}" if standin else "as published at the handle",
    }


# Metadata that must match for vectors of two runs to be comparable. The model is compared by content (its
# fingerprint), not by where it was loaded from; outputs written before fingerprints existed compare handles.
COMPARABLE_METADATA = ("model", "fingerprint", "image_size", "dim", "preprocessing", "precision", "weights")


def metadata_differences(then: dict[str, str], now: dict[str, str]) -> list[str]:
    """'field: then, now' for every comparable field that differs; empty when the vectors are comparable."""
    keys = COMPARABLE_METADATA if "fingerprint" in then else [k if k != "fingerprint" else "handle"
                                                              for k in COMPARABLE_METADATA]
    return [f"{key}: {then.get(key)!r} then, {now.get(key)!r} now" for key in keys if then.get(key) != now.get(key)]


def expand_previous_outputs(values) -> list[str]:
    """Each --skip_existing value is a run folder or a glob of run folders; a glob that finds none is an error."""
    folders = []
    for value in values:
        if has_glob(value):
            found = sorted({m.path.rsplit("/", 1)[0] for name in FINISHED_MARKERS
                            for m in FileSystems.match([FileSystems.join(value, name)])[0].metadata_list})
            if not found:
                raise IncrementalRunError(f"--skip_existing {value} matches no finished run (no {RUN_REPORT} or "
                                          f"{PIPELINE_DONE} below it).")
            folders += found
        else:
            folders.append(value.rstrip("/"))
    return list(dict.fromkeys(folders))


def check_previous_outputs(config: JobConfig, metadata: dict[str, str]) -> None:
    """Refuses to skip ids embedded by a run that is unfinished or used another model or preprocessing."""
    if config.force_full_run:
        return
    for folder in config.skip_existing:
        if folder == config.output_dir:
            raise IncrementalRunError(
                f"--skip_existing and --output are the same folder ({folder}); write each run to a new --output."
            )
        previous = summarize_outputs(folder)
        if not previous.embedding_files:
            raise IncrementalRunError(f"--skip_existing {folder} holds no embeddings-*.parquet files.")
        if not is_finished_run(folder):
            raise IncrementalRunError(
                f"--skip_existing {folder} is not a finished run (no {RUN_REPORT} or {PIPELINE_DONE}): its files may be "
                f"partial. Rerun it, or pass --force_full_run to embed everything."
            )
        differences = metadata_differences(previous.metadata, metadata)
        if differences:
            raise IncrementalRunError(
                f"--skip_existing {folder} was made with another model or preprocessing "
                f"({'; '.join(differences)}); its vectors are not comparable. Pass --force_full_run to embed "
                f"everything."
            )
