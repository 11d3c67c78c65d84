"""The embedded digits model, its classifier and the quality metrics used by compare.py (see digits/model.py)."""
