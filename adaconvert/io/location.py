"""Where things are: the one rule for "is this a Hub id or a local path?", used by every place that accepts either,
and the directory adaconvert keeps its caches in."""

from __future__ import annotations

import os
import re
from pathlib import Path

from adaconvert.errors import SourceNotFoundError

# ``name`` (legacy, e.g. ``gpt2``) or ``namespace/name``: letters, digits, ``_ . -``, each part starting with a letter
# or digit, no ``--`` or ``..`` (the Hub's own rule), at most 96 characters per part
_HUB_ID_RE = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# a name ending like this is a file someone meant, not a repository
_FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".tsv", ".parquet", ".safetensors", ".bin", ".pt", ".pth")


def is_hub_id(src: str | Path | None) -> bool:
    """Whether ``src`` names a Hub repository rather than a local path.

    It does when it is not something on disk (a dangling symlink counts as on disk), has the Hub's repo id syntax
    (``name`` or ``namespace/name``), does not end in a file suffix (``.json``, ``.safetensors``...) and, for
    ``namespace/name``, ``namespace`` is not a local directory (``runs/ada`` beside a ``runs/`` directory is a
    path that is missing, not a repo). Everything else is a local path, so a missing one is "not found" at once,
    without a network round trip.

    Example:
        >>> is_hub_id("Qwen/Qwen2.5-0.5B"), is_hub_id("./runs/ada"), is_hub_id("a/b/c")
        (True, False, False)
    """
    if src is None:
        return False
    text = str(src)
    if not _HUB_ID_RE.match(text) or text.lower().endswith(_FILE_SUFFIXES) or os.path.lexists(text):
        return False
    namespace, sep, _ = text.partition("/")
    return not (sep and os.path.isdir(namespace))


def require_source(src: str | Path) -> None:
    """Fail at once for a local path that does not exist; Hub ids are left to whoever fetches them.

    Raises:
        SourceNotFoundError: ``src`` is not a Hub id (:func:`is_hub_id`) and nothing is there.
    """
    if not is_hub_id(src) and not os.path.lexists(src):
        raise SourceNotFoundError("no such file or directory", path=src)


def cache_root() -> Path:
    """adaconvert's cache directory: ``$ADACONVERT_CACHE``, else ``$XDG_CACHE_HOME/adaconvert``, else
    ``~/.cache/adaconvert`` (not created here)."""
    if os.environ.get("ADACONVERT_CACHE"):
        return Path(os.environ["ADACONVERT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaconvert"
