"""Pure ``Adapter -> Adapter`` transforms (and per-module helpers): no I/O, inputs never mutated."""

from adaconvert.transforms.compress import compress_ranks, low_rank_svd
from adaconvert.transforms.pad import padding_params, uniform_modules, zero_delta
from adaconvert.transforms.strip import strip_empty

__all__ = [
    "compress_ranks",
    "low_rank_svd",
    "padding_params",
    "strip_empty",
    "uniform_modules",
    "zero_delta",
]
