"""Shared machinery (distributed, checkpoints, logging, schedules, ...) and helper entry points."""
