"""Builds the `pipeline` and `transforms` packages from pyproject.toml's metadata.

Kept for Beam's --setup_file, which ships the project to Dataflow workers by running `python setup.py sdist`.
"""

import setuptools

setuptools.setup()
