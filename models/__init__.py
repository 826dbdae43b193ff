"""Networks and their files: the method (``simreg.py``), networks by name, teachers and checkpoint formats.

Ground floor: nothing here imports from ``tools/`` or the entry scripts.
"""
