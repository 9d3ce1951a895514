"""The ``adaconvert`` command line: a thin click layer over the Python API (``main`` is the entry point)."""

from adaconvert.cli.main import cli, main

__all__ = ["cli", "main"]
