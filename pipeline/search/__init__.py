"""Search over embeddings: a nearest-neighbour index, queries by image or id, near-duplicates, contact sheets."""
