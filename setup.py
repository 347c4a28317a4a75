"""Installs the `pipeline` and `transforms` packages; also Beam's --setup_file for Dataflow workers."""

import setuptools

REQUIRED = [
    # A set measured to resolve and work together (tfx-bsl pins TensorFlow and Beam's range).
    "apache-beam[gcp]==2.77.0",
    "tensorflow==2.21.0",
    "tensorflow-hub==0.16.1",
    "tf-keras==2.21.0",  # tensorflow_hub imports it, even though we load with hub.load
    "tfx-bsl==1.21.0",
    "pyarrow==25.0.1",
    "pillow==12.3.0",
    "rich==15.0.0",  # the progress bar
    "ai-edge-litert==2.3.0",  # the compiled CPU engine (LiteRT with XNNPACK)
]

TEST = [
    "pytest==9.2.0",
    "scikit-image==0.26.0",  # real photos for tests and benchmarks
    "duckdb==2.0.0",
    "polars==2.1.0",
]

setuptools.setup(
    name="beam-image-embeddings",
    version="0.1.0",
    description="Batch image embeddings with TF Hub feature-vector models on Apache Beam, written to Parquet.",
    packages=["pipeline", "transforms"],
    python_requires=">=3.10,<3.13",
    install_requires=REQUIRED,
    extras_require={"test": TEST},
)
