"""Data pipeline: read sources, normalise formats, tokenize with label masks, pack, load."""
