"""Composes the image-embedding pipeline: options, model registry, entry point."""
