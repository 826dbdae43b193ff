"""Datasets, transform presets, loaders and the embedded demo data.

Ground floor: nothing here imports from ``tools/`` or the entry scripts.
"""
