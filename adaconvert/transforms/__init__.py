"""Pure ``Adapter -> Adapter`` transforms: no I/O, inputs never mutated."""

from adaconvert.transforms.compress import compress_ranks, low_rank_svd
from adaconvert.transforms.pad import pad_ranks
from adaconvert.transforms.strip import strip_empty

__all__ = ["compress_ranks", "low_rank_svd", "pad_ranks", "strip_empty"]
