"""Serving converted adapters under vLLM's OpenAI-compatible server."""

from adaconvert.serving.server import serve

__all__ = ["serve"]
