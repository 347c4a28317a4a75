"""Publishing an index's current view into the databases similarity search is served from (PostgreSQL with
pgvector, LanceDB): `python -m pipeline.index publish`. See sync.py for the contract."""
