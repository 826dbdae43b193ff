"""Shipping a network and running beyond one machine: exports (``tools.export``) and SLURM jobs (``tools.submit``)."""
