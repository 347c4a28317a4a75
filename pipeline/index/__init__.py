"""An index kept up to date night after night: `python -m pipeline.index update|status|snapshot` (see __main__)."""
