"""Record -> Sample -> Batch: tokenisation, media loading and collation."""
