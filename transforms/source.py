"""Source: `--input` (a manifest, a folder, a glob of image files, or TFRecord files) -> unique (id, uri) inputs.

Without an id the id is the URI exactly as given. Ids must be unique: the first row with an id (in
file order) is embedded and every later row with the same id is reported as a duplicate (stage
"manifest"). Grouping by id also spreads the work across workers.

What `--input` is gets decided by what exists, and the launcher says which reading it chose:
an existing folder -> every image file under it; an existing file with a manifest extension -> a
manifest (even with `?` or `[` in its name); a name containing `.tfrecord` -> TFRecord files; glob
characters -> a glob, where `**/` matches zero or more folders (as in bash globstar and gsutil).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.manifest import (
    MANIFEST_EXTENSIONS,
    ManifestError,
    ManifestRow,
    ReadManifest,
    check_manifest,
    count_manifest_rows,
    read_header,
)
from transforms.records import FAILED, Failure, ImageRef, Stage, plural
from transforms.tfrecord import KeptImages, TFRecordFeatures, read_tfrecord_file
from transforms.uri_reader import ReadConfig, has_glob

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
SKIPPED_COUNTER = "skipped_existing"
SKIPPED = "skipped"  # tag of the ids skipped because an earlier run embedded them
PASSED_OVER = "passed_over"  # tag of the orders of the rows the duplicate rule did not keep


def _is_directory(path: str) -> bool:
    return os.path.isdir(path) or (path.endswith("/") and "://" in path)


def input_kind(path: str) -> str:
    """'directory', 'manifest', 'tfrecord' or 'glob' for `--input`; anything else is a clear error."""
    lower = os.path.basename(path.rstrip("/")).lower()
    if _is_directory(path):
        return "directory"
    if lower.endswith(MANIFEST_EXTENSIONS) and (not has_glob(path) or FileSystems.exists(path)):
        return "manifest"
    if ".tfrecord" in lower:
        return "tfrecord"
    if has_glob(path) or (has_image_extension(path) and FileSystems.exists(path)):
        return "glob"  # a single image file is a glob that matches itself
    raise ManifestError(
        f"--input {path} is not a folder, a glob, TFRecord files or a manifest ({', '.join(MANIFEST_EXTENSIONS)})."
        + ("" if FileSystems.exists(path) else " It does not exist.")
    )


def glob_variants(pattern: str) -> list[str]:
    """Beam's `**` needs at least one folder; `**/` here matches zero or more, so match each way."""
    parts = pattern.split("/**/")
    variants = set()
    for joints in itertools.product(("/**/", "/"), repeat=len(parts) - 1):
        variants.add(parts[0] + "".join(j + p for j, p in zip(joints, parts[1:])))
    return sorted(variants)


def has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _directory_pattern(path: str) -> str:
    return FileSystems.join(path.rstrip("/"), "**")


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """What the launcher found behind `--input`, said before any work starts and kept in the run report."""

    kind: str
    inputs: int  # rows, files or TFRecord files, as `unit` says
    unit: str
    left_out: int = 0  # files in a folder without an image extension
    columns: tuple = ()

    def describe(self, path: str) -> str:
        text = {
            "manifest": f"Reading --input {path} as a manifest: {plural(self.inputs, 'row')}.",
            "glob": f"Reading --input {path} as a glob: {plural(self.inputs, 'file')} matched.",
            "directory": f"Reading --input {path} as a folder: {plural(self.inputs, 'image file')} under it",
            "tfrecord": f"Reading --input {path} as TFRecord files of tf.train.Example: {plural(self.inputs, 'file')}.",
        }[self.kind]
        if self.kind == "directory":
            text += (f"; {plural(self.left_out, 'other file')} left out by extension "
                     f"(images: {', '.join(IMAGE_EXTENSIONS)})." if self.left_out else ".")
        return text


def _matched_paths(patterns: list[str]) -> list[str]:
    found = set()
    for result in FileSystems.match(patterns):
        found.update(m.path for m in result.metadata_list)
    return sorted(found)


def plan_input(path: str) -> InputPlan:
    """The launcher's look at `--input`: what kind it is and how many inputs it gives, or a clear error."""
    kind = input_kind(path)
    if kind == "manifest":
        columns = check_manifest(path)
        return InputPlan(kind, count_manifest_rows(path), "rows", columns=tuple(columns))
    if kind == "directory":
        files = _matched_paths([_directory_pattern(path)])
        images = sum(1 for f in files if has_image_extension(f))
        return InputPlan(kind, images, "files", left_out=len(files) - images)
    if kind == "tfrecord":
        files = _matched_paths([path])
        if not files:
            raise ManifestError(f"--input {path} matches no TFRecord files.")
        return InputPlan(kind, len(files), "TFRecord files")
    matched = len(_matched_paths(glob_variants(path)))
    if not matched:
        raise ManifestError(f"--input {path} matches no files. Check the pattern (a wrong date or folder, files not "
                            f"written yet?); quote it so that the shell does not expand it.")
    return InputPlan(kind, matched, "files")


class ReadTFRecordFiles(beam.PTransform):
    """A glob of TFRecord files -> their paths, spread across workers (a file is read by one worker)."""

    def __init__(self, file_pattern: str):
        super().__init__()
        self._pattern = file_pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "Pattern" >> beam.Create([self._pattern])
            | "MatchFiles" >> fileio.MatchAll()
            | "Paths" >> beam.Map(lambda metadata: metadata.path)
            | "SpreadFiles" >> beam.Reshuffle()
        )


class MatchImageFiles(beam.PTransform):
    """A glob (with `**/` matching zero or more folders) or a folder -> ManifestRow per file, each once."""

    def __init__(self, path: str, kind: str):
        super().__init__()
        self._patterns = [_directory_pattern(path)] if kind == "directory" else glob_variants(path)
        self._images_only = kind == "directory"

    def expand(self, pbegin):
        paths = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "MatchFiles" >> fileio.MatchAll()
            | "Paths" >> beam.Map(lambda metadata: metadata.path)
        )
        if self._images_only:
            paths = paths | "ImagesOnly" >> beam.Filter(has_image_extension)
        if len(self._patterns) > 1:  # the variants of a pattern with several `**/` may overlap
            paths = paths | "Distinct" >> beam.Distinct()
        return paths | "ToRows" >> beam.Map(lambda path: ManifestRow((path,), path, path, path))


class _KeepFirstRowPerId(beam.DoFn):
    """After grouping by id: the lowest-numbered row is the input, the others are reported.

    An id already embedded by a previous run (`--skip_existing`) is skipped with all its rows.
    """

    def __init__(self):
        self._duplicates = Metrics.counter("embeddings", "duplicate_ids")
        self._skipped = Metrics.counter("embeddings", SKIPPED_COUNTER)

    def process(self, id_and_groups):
        id_, groups = id_and_groups
        rows = sorted(groups["rows"], key=lambda row: row.order)
        if rows and any(True for _ in groups["previous"]):
            self._skipped.inc(len(rows))
            for row in rows:
                yield beam.pvalue.TaggedOutput(SKIPPED, row.id)
                yield beam.pvalue.TaggedOutput(PASSED_OVER, row.order)
        elif rows:  # an id of the previous output that this run's input does not list has no rows
            first, *others = rows
            yield ImageRef(id_, first.uri)
            for row in others:
                self._duplicates.inc()
                message = f"Duplicate id: the {row.where} repeats the id of the {first.where}, which is the one embedded."
                yield beam.pvalue.TaggedOutput(FAILED, Failure(id_, row.uri, Stage.MANIFEST, message))
                yield beam.pvalue.TaggedOutput(PASSED_OVER, row.order)


def _split_problems(row: ManifestRow):
    if row.problem:
        yield beam.pvalue.TaggedOutput(FAILED, Failure(row.id, row.uri, Stage.MANIFEST, row.problem))
    else:
        yield row


class ReadImageRefs(beam.PTransform):
    """`--input` -> {"refs": ImageRef with unique ids, FAILED: Failure, SKIPPED: ids an earlier run embedded}.

    Grouping by id both enforces the duplicate rule and redistributes the inputs across workers,
    so no separate Reshuffle is needed. With `previous_embeddings` (globs of earlier runs' embeddings
    files) the same grouping drops ids that are already embedded. Only ids and uris are grouped: TFRecord
    images are read again after the grouping, for the records it kept (tfrecord.py).
    """

    def __init__(
        self,
        input_path: str,
        previous_embeddings: Sequence[str] = (),
        tfrecord_features: TFRecordFeatures = TFRecordFeatures(),
        max_image_bytes: int = ReadConfig.max_bytes,
    ):
        super().__init__()
        self._input = input_path
        self._kind = input_kind(input_path)
        self._previous = list(previous_embeddings)
        self._tfrecord_features = tfrecord_features
        self._max_image_bytes = max_image_bytes

    def expand(self, pbegin):
        features, limit = self._tfrecord_features, self._max_image_bytes
        if self._kind in ("glob", "directory"):
            rows = pbegin | "MatchImageFiles" >> MatchImageFiles(self._input, self._kind)
        elif self._kind == "tfrecord":
            files = pbegin | "TFRecordFiles" >> ReadTFRecordFiles(self._input)
            rows = (files | "ReadRecordIds" >> beam.FlatMap(read_tfrecord_file, features, limit)
                    | "DropImages" >> beam.Map(lambda row: row._replace(data=None)))
        else:
            rows = pbegin | "ReadManifest" >> ReadManifest(self._input, read_header(self._input))
        usable = rows | "SplitUnusable" >> beam.FlatMap(_split_problems).with_outputs(FAILED, main="rows")
        keyed = {"rows": usable.rows | "KeyById" >> beam.Map(lambda row: (row.id, row))}
        if self._previous:
            keyed["previous"] = (
                pbegin
                | "PreviousOutputs" >> beam.Create(self._previous)
                | "ReadPreviousIds" >> beam.io.ReadAllFromParquet(columns=["id"])
                | "KeyPreviousIds" >> beam.Map(lambda record: (record["id"], None))
            )
        else:
            keyed["previous"] = pbegin | "NoPreviousIds" >> beam.Create([])
        unique = (
            keyed
            | "GroupById" >> beam.CoGroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstRowPerId()).with_outputs(FAILED, SKIPPED, PASSED_OVER, main="refs")
        )
        refs = unique.refs
        if self._kind == "tfrecord":
            refs = files | "ReadKeptImages" >> beam.ParDo(KeptImages(features, limit),
                                                          beam.pvalue.AsList(unique[PASSED_OVER]))
        failures = (usable[FAILED], unique[FAILED]) | "Failures" >> beam.Flatten()
        return {"refs": refs, FAILED: failures, SKIPPED: unique[SKIPPED]}
