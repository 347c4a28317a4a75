"""Query by image or by id: images are embedded exactly as the index's vectors were, then the nearest rows found.

An image query goes through the pipeline's own reader and decoder with the preprocessing the embeddings
recorded, and through the model whose content fingerprint the index recorded: another model is refused,
since its vectors would not be comparable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.fingerprint import model_fingerprint
from pipeline.search.store import SearchIndex, write_parquet
from pipeline.storage import write_bytes
from transforms.decode import RESIZE_MODES, TRUNCATED_HINT, PreprocessConfig, decode_read_bytes
from transforms.records import Failure, ImageRef, Stage
from transforms.uri_reader import ReadConfig, ReadError, read_uri

QUERY_BATCH = 32
READ_THREADS = 16  # query images are read concurrently: they may be on a web server or object store
HITS_SCHEMA = pa.schema([("query", pa.string()), ("rank", pa.int32()), ("id", pa.string()), ("uri", pa.string()),
                         ("similarity", pa.float32())])


class QueryRefused(ValueError):
    """The query cannot be answered by this index as asked; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Hit:
    query: str
    rank: int  # 1 = nearest
    id: str
    uri: Optional[str]
    similarity: float


def recorded_preprocessing(model: dict) -> PreprocessConfig:
    """The PreprocessConfig the indexed vectors were made with, from the embeddings' metadata."""
    if "preprocess" in model:
        fields = json.loads(model["preprocess"])
        return PreprocessConfig(**{**fields, "background": tuple(fields["background"])})
    size = int(model["image_size"])  # outputs written before the fields were recorded: match the description
    for mode in RESIZE_MODES:
        for truncated in (False, True):
            candidate = PreprocessConfig(image_size=size, resize_mode=mode, allow_truncated=truncated)
            if candidate.describe() == model.get("preprocessing"):
                return candidate
    raise QueryRefused(f"The index's vectors were made with preprocessing this version cannot repeat "
                       f"({model.get('preprocessing')}); query by --id, or rebuild from a new run.")


def load_query_model(model: dict, handle: Optional[str] = None):
    """The index's model, loaded in TensorFlow; `handle` (a mirror) must hold the same files."""
    from pipeline.preflight import check_model
    from transforms.embed import EmbedConfig

    handle = handle or model["handle"]
    recorded = model.get("fingerprint")
    if recorded:
        try:
            found = model_fingerprint(handle)
        except Exception as exc:
            raise QueryRefused(f"Cannot read the model at {handle} to check it is the index's model "
                               f"({' '.join(str(exc).split())}); pass --model_handle with a copy of it.") from None
        if found != recorded:
            raise QueryRefused(
                f"The model at {handle} is not the one this index was built with ({model.get('model')}, "
                f"fingerprint {recorded[:19]}..., found {found[:19]}...): its vectors are not comparable. "
                f"Query with that model (--model_handle a copy of {model['handle']}), or build an index of "
                f"this model's embeddings.")
    config = EmbedConfig(handle=handle, image_size=int(model["image_size"]), dim=int(model["dim"]),
                         bfloat16=model.get("precision", "").startswith("bfloat16"))
    return check_model(config)


def embed_images(uris: list, model: dict, handle: Optional[str], read: ReadConfig = ReadConfig()):
    """(vectors [n, dim] of the readable images, their uris, failures as (uri, reason)) in input order."""
    preprocess = recorded_preprocessing(model)

    def decoded(uri: str):
        try:
            result = decode_read_bytes(ImageRef(uri, uri), read_uri(uri, read), preprocess)
        except ReadError as exc:
            return Failure(uri, uri, Stage.READ, str(exc))
        if isinstance(result, Failure) and TRUNCATED_HINT in result.error:  # the index's preprocessing decides
            return result._replace(error=result.error.replace(
                TRUNCATED_HINT, " The index was made without --allow_truncated_images, so its queries refuse "
                "truncated images too; query with a complete copy."))
        return result

    pixels, kept, failures = [], [], []
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        for uri, result in zip(uris, pool.map(decoded, uris)):
            if isinstance(result, Failure):
                failures.append((uri, result.error))
            else:
                pixels.append(result.pixels)
                kept.append(uri)
    if not pixels:
        return np.zeros((0, int(model["dim"])), np.float32), kept, failures
    embedder = load_query_model(model, handle)
    vectors = np.concatenate([embedder(pixels[i:i + QUERY_BATCH]) for i in range(0, len(pixels), QUERY_BATCH)])
    return vectors, kept, failures


def nearest(index: SearchIndex, vectors: np.ndarray, queries: list, k: int, own_rows: Optional[list] = None) -> list:
    """The k nearest rows for each query vector; a query that is an indexed row gets itself first."""
    extra = 1 if own_rows else 0
    similarities, rows = index.vectors.search(vectors, k + extra)
    ranked_per_query = []
    for position in range(len(queries)):
        ranked = [(float(s), int(r)) for s, r in zip(similarities[position], rows[position]) if r >= 0]
        if own_rows:
            own, vector = own_rows[position], vectors[position]  # a stored, normalised vector
            ranked = [(float(vector @ vector), own)] + [pair for pair in ranked if pair[1] != own]
        ranked_per_query.append(ranked[:k])
    wanted = sorted({row for ranked in ranked_per_query for _, row in ranked})
    found = index.items.take(wanted)  # only the row groups of the hits are read
    item = dict(zip(wanted, zip(found.column("id").to_pylist(), found.column("uri").to_pylist())))
    hits = []
    for query, ranked in zip(queries, ranked_per_query):
        hits += [Hit(query, rank, *item[row], similarity) for rank, (similarity, row) in enumerate(ranked, start=1)]
    return hits


def query_by_ids(index: SearchIndex, ids: list, k: int) -> tuple[list, list]:
    """(hits, failures) for queries by indexed id."""
    rows = index.rows_of(ids)
    gone = index.items.removed_ids([id_ for id_, row in zip(ids, rows) if row is None])
    source = index.manifest.get("index_source", {}).get("root")
    unknown = [(id_, f"id {id_!r} was in the index and is gone: it left the view of {source} (search update "
                     f"removed it)." if id_ in gone else f"id {id_!r} is not in the index ({index.root}).")
               for id_, row in zip(ids, rows) if row is None]
    known = [(id_, row) for id_, row in zip(ids, rows) if row is not None]
    if not known:
        return [], unknown
    vectors = index.vectors.vectors([row for _, row in known])
    return nearest(index, vectors, [id_ for id_, _ in known], k, own_rows=[row for _, row in known]), unknown


def query_by_images(index: SearchIndex, uris: list, k: int, handle: Optional[str]) -> tuple[list, list]:
    """(hits, failures) for queries by image path or URI."""
    vectors, kept, failures = embed_images(uris, index.model, handle)
    return (nearest(index, vectors, kept, k) if kept else []), failures


def write_hits(hits: list, path: str) -> None:
    """One row per hit: query, rank, id, uri, similarity; Parquet or JSON by the file's extension."""
    rows = [dataclasses.asdict(hit) for hit in hits]
    if path.endswith(".json"):
        write_bytes(path, json.dumps(rows, indent=1).encode())
    else:
        write_parquet(pa.Table.from_pylist(rows, schema=HITS_SCHEMA), path)
