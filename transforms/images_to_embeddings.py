"""The composite: image references from any PCollection -> Embedding, or the input's Failure, one per element.

The commands put a source in front of it and the Parquet sinks behind it; a Beam user puts their own
(BigQuery rows, Pub/Sub messages, a list) in front and any sink behind.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import apache_beam as beam

from transforms.decode import DecodeImages, PreprocessConfig
from transforms.embed import EmbedConfig, EmbedImages
from transforms.records import FAILED, Failure, ImageRef, Stage
from transforms.row_checks import id_problem, shown, uri_problem
from transforms.uri_reader import ReadConfig


class EmbeddingResults(NamedTuple):
    """What ImagesToEmbeddings returns: every input element is in exactly one of the two."""

    embeddings: beam.PCollection  # of Embedding(id, uri, vector float32 [dim], sha256)
    failures: beam.PCollection  # of Failure(id, uri, stage, error, bytes_version)


class _ToImageRefs(beam.DoFn):
    """An element -> ImageRef, or its Failure (stage "manifest") when it names no readable image."""

    def __init__(self, id_field: str, uri_field: str):
        self._id_field = id_field
        self._uri_field = uri_field

    def process(self, element):
        if isinstance(element, ImageRef):  # the commands' source has checked these already
            yield element
            return
        id_, uri = self._id_and_uri(element)
        if not isinstance(uri, str) or not isinstance(id_, str):
            yield self._failed(element, f"is {shown(repr(element))}, which is not a uri, an (id, uri) pair, a "
                               f"mapping with {self._uri_field!r} (and optionally {self._id_field!r}) or an "
                               f"ImageRef; ids and uris must be str.")
            return
        problem = uri_problem(uri) or id_problem(id_)
        if problem:
            yield self._failed(element, problem, id_, uri)
        else:
            yield ImageRef(id_, uri)

    def _id_and_uri(self, element) -> tuple:
        if isinstance(element, str):
            return element, element
        if isinstance(element, tuple) and len(element) == 2:
            return element
        if isinstance(element, Mapping) and self._uri_field in element:
            uri = element[self._uri_field]
            return element.get(self._id_field) or uri, uri
        return None, None

    @staticmethod
    def _failed(element, problem: str, id_=None, uri=None):
        id_ = shown(id_ if isinstance(id_, str) else repr(element))
        uri = shown(uri) if isinstance(uri, str) else ""
        return beam.pvalue.TaggedOutput(FAILED, Failure(id_, uri, Stage.MANIFEST, f"The input element {problem}"))


class ImagesToEmbeddings(beam.PTransform):
    """PCollection of image references -> EmbeddingResults(embeddings, failures).

    An element is a uri (str: it is also the id), an (id, uri) pair, a mapping such as a BigQuery row with
    `uri_field` and optionally `id_field`, or an ImageRef. Each image is read (local, gs://, s3://, http(s)),
    decoded and resized by the pipeline's one preprocessing definition, and embedded in batches through
    Beam's RunInference. An element that cannot be read, decoded or embedded is a Failure with one sentence
    saying why; nothing is dropped. Ids are passed through as given: this transform does not deduplicate.
    """

    def __init__(
        self,
        model: EmbedConfig,
        preprocess: Optional[PreprocessConfig] = None,
        read: ReadConfig = ReadConfig(),
        decode_threads: int = 1,
        id_field: str = "id",
        uri_field: str = "uri",
    ):
        super().__init__()
        self._model = model
        self._preprocess = preprocess or PreprocessConfig(image_size=model.image_size)
        if self._preprocess.image_size != model.image_size:
            raise ValueError(f"The preprocessing resizes to {self._preprocess.image_size}px but the model takes "
                             f"{model.image_size}px; give both the same size.")
        self._read = read
        self._decode_threads = decode_threads
        self._fields = (id_field, uri_field)

    def expand(self, elements) -> EmbeddingResults:
        refs = elements | "ToImageRefs" >> beam.ParDo(_ToImageRefs(*self._fields)).with_outputs(FAILED, main="refs")
        decoded = refs.refs | "Decode" >> DecodeImages(self._preprocess, self._read, self._decode_threads)
        embedded = decoded.decoded | "Embed" >> EmbedImages(self._model)
        failures = (refs[FAILED], decoded[FAILED], embedded[FAILED]) | "Failures" >> beam.Flatten()
        return EmbeddingResults(embedded.embeddings, failures)
