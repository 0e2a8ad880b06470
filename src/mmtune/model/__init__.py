"""Composite-model registry, loading, freezing and adapters."""
