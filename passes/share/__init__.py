"""Weight sharing: deduplication and clustering into codebooks."""
