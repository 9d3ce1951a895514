"""Flags and output helpers every verb shares."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable

import click

from adaconvert.process import deferred_log_records, import_torch, quiet_third_party


def common_options(*, overwrite: bool = False, one_torch_thread: bool = False, library_log_here: bool = False):
    """The flags every command shares: --json, --debug, --quiet (and --overwrite for commands that write).

    Every command needs torch: it is imported here (:func:`import_torch`), once the arguments are parsed, so that
    ``--help`` stays instant; ``one_torch_thread`` as in :func:`import_torch`. bitsandbytes' warnings are held back
    and shown once each after the command's output (:func:`deferred_log_records`; none with ``-q``), unless
    ``library_log_here``: the command routes third-party output itself (the demo's log file).
    """

    def decorate(fn):
        @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
        @click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
        @click.option("--quiet", "-q", is_flag=True, help="Only errors on stderr; no progress bars.")
        @functools.wraps(fn)
        def wrapper(*args, as_json: bool, debug: bool, quiet: bool, **kwargs):
            level = logging.DEBUG if debug else logging.ERROR if quiet or as_json else logging.INFO
            logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
            import_torch(one_thread=one_torch_thread)
            held = contextlib.nullcontext() if library_log_here else deferred_log_records("bitsandbytes")
            with held, quiet_third_party(level >= logging.ERROR):
                return fn(*args, as_json=as_json, **kwargs)

        if overwrite:
            wrapper = click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")(wrapper)
        return wrapper

    return decorate


def compression_options(fn):
    """--max-rank, --energy, --tol: the rank compression every export verb offers (see ``prepare_conversion``)."""
    options = [
        click.option("--max-rank", type=int, help="Cap every module's rank (best approximation by SVD)."),
        click.option("--energy", type=float, help="Keep singular values up to this fraction of each module's energy."),
        click.option("--tol", type=float, help="Max relative Frobenius error per module; keep the smallest rank."),
    ]
    for option in reversed(options):  # click lists options in decoration order, outermost first
        fn = option(fn)
    return fn


def emit(result: dict | Callable[[], dict], text: str, *, as_json: bool) -> None:
    """Results go to stdout: JSON with --json, else the human text.

    ``result``: the JSON form, or a function that makes it (called only with --json: a conversion report's
    224-module dict costs ~5 ms that the text does not need).
    """
    if as_json:
        click.echo(json.dumps(result() if callable(result) else result, indent=2, default=str))
    else:
        click.echo(text)


def name_value(items, what: str) -> list[tuple[str, str]]:
    """``["a=b", ...]`` → ``[("a", "b"), ...]``, split at the first ``=``; a UsageError naming ``what`` otherwise."""
    pairs = [tuple(item.split("=", 1)) for item in items]
    bad = [item for item, pair in zip(items, pairs, strict=True) if len(pair) != 2 or not all(pair)]
    if bad:
        raise click.UsageError(f"expected {what}, got {bad[0]!r}")
    return pairs
