"""Activations on disk: the cache format, the file loader and the streaming cache."""
