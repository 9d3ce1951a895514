"""``to_lora_many``: convert many adapters in parallel worker processes, past bad ones, with a summary table.

Each source goes to ``output_dir/<name>`` through :func:`adaconvert.conversion.peft_lora.to_lora` (its own report
and card); a failure is recorded and the batch goes on. ``batch_summary.json`` and ``batch_summary.md`` list every
source. Workers are spawned (not forked), so this is safe from threads and on every platform; the worker function is
module-level and its arguments are plain strings and numbers.
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaconvert.errors import AdaconvertError, BatchConversionError, InvalidConfigError, SourceNotFoundError
from adaconvert.io.atomic import atomic_output_files, check_no_overlap, check_output
from adaconvert.process import torch_threads

logger = logging.getLogger(__name__)

SUMMARY_JSON = "batch_summary.json"
SUMMARY_MD = "batch_summary.md"
_GLOB_CHARS = set("*?[")


@dataclass
class BatchItem:
    """One source of a batch: where it went and what came of it (``error`` is one line when it failed)."""

    source: str
    destination: str
    ok: bool
    error: str | None = None
    error_type: str | None = None
    modules: int = 0
    max_rank: int = 0
    vllm_max_lora_rank: int | None = None
    params_before: int = 0
    params_after: int = 0
    max_rel_error: float | None = None
    seconds: float = 0.0
    traceback: str | None = None  # only for unexpected (internal) errors; logged at debug level


@dataclass
class BatchResult:
    """Every item, in the order of the sources, and the totals."""

    output_dir: str
    jobs: int
    items: list[BatchItem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[BatchItem]:
        return [item for item in self.items if not item.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "succeeded": len(self.items) - len(self.failures),
            "failed": len(self.failures),
            "adapters_per_second": len(self.items) / self.seconds if self.seconds else None,
        }

    def table(self) -> str:
        """The summary as a markdown table, one row per source, failures with their error."""
        lines = [
            "| source | status | modules | max rank | vLLM rank | params | max rel. error | s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for it in self.items:
            if it.ok:
                err = f"{it.max_rel_error:.1e}" if it.max_rel_error is not None else "–"
                cells = ["ok", it.modules, it.max_rank, it.vllm_max_lora_rank, f"{it.params_after:,}", err]
            else:
                cells = [f"FAILED: {it.error}".replace("|", "\\|"), "", "", "", "", ""]
            lines.append(f"| {it.source} | " + " | ".join(map(str, cells)) + f" | {it.seconds:.2f} |")
        n_ok = len(self.items) - len(self.failures)
        lines.append(f"\n{n_ok} of {len(self.items)} converted in {self.seconds:.1f} s with {self.jobs} job(s)")
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raise :class:`BatchConversionError` naming every failed source, if any failed."""
        if self.failures:
            named = "; ".join(f"{it.source} ({it.error})" for it in self.failures)
            raise BatchConversionError(
                f"{len(self.failures)} of {len(self.items)} adapters failed: {named}",
                path=self.output_dir,
                failures={it.source: it.error for it in self.failures},
            )


def expand_sources(args: Iterable[str]) -> list[str]:
    """Sources from command-line words: a path or Hub id as is, a glob pattern (``runs/*/final``) expanded and
    sorted, ``@list.txt`` read one source per line (blank lines and ``#`` comments skipped). Duplicates dropped.

    Raises:
        SourceNotFoundError: a list file is missing, or a glob pattern matches nothing.
    """
    out: list[str] = []
    for arg in args:
        if arg.startswith("@"):
            path = Path(arg[1:])
            if not path.is_file():
                raise SourceNotFoundError("source list file not found", path=path)
            lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
            out += expand_sources(line for line in lines if line and not line.startswith("#"))
        elif _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg))
            if not matches:
                raise SourceNotFoundError("glob pattern matches nothing", path=arg)
            out += matches
        else:
            out.append(arg)
    return list(dict.fromkeys(out))


def output_names(sources: list[str]) -> list[str]:
    """A distinct directory name per source: its last path component, extended with parent components
    (joined by ``--``) where names collide (``runs/a/final`` and ``runs/b/final`` → ``a--final``, ``b--final``)."""
    parts = [[p for p in Path(s).parts if p not in ("/", ".", "..")] or [s] for s in sources]
    depth = [1] * len(sources)
    while True:
        names = ["--".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            seen.setdefault(name, []).append(i)
        clashes = [i for group in seen.values() if len(group) > 1 for i in group if depth[i] < len(parts[i])]
        if not clashes:
            dupes = [name for name, group in seen.items() if len(group) > 1]
            if dupes:
                raise InvalidConfigError(f"two sources would both be written to {dupes[0]!r}; rename one")
            return names
        for i in clashes:
            depth[i] += 1


def to_lora_many(
    sources: Iterable[str | Path],
    output_dir: str | Path,
    *,
    jobs: int = 1,
    overwrite: bool = False,
    raise_on_failure: bool = True,
    progress: bool = False,
    **options,
) -> BatchResult:
    """Convert every source with :func:`~adaconvert.conversion.peft_lora.to_lora` into ``output_dir/<name>``,
    ``jobs`` at a time.

    A source that fails (missing, corrupt, over a rank limit, output exists...) is recorded with its one-line
    error and the others go on. ``batch_summary.json`` and ``batch_summary.md`` are written to ``output_dir``.
    With ``jobs`` > 1 the workers are spawned: a script calling this needs the ``if __name__ == "__main__":`` guard.

    Args:
        sources: adapter directories or Hub ids (see :func:`expand_sources` for globs and list files).
        output_dir: created if missing; each adapter goes to a subdirectory named after its source.
        jobs: worker processes; 1 converts in this process. Every conversion runs on one torch thread.
        overwrite: replace existing outputs (and the summary files).
        raise_on_failure: after the whole batch, raise :class:`BatchConversionError` naming every failure;
            with False, return the result and let the caller look at ``result.failures``.
        progress: a tqdm bar on stderr.
        **options: passed to ``to_lora`` (``max_rank``, ``energy``, ``tol``, ``vllm_max_lora_rank``, ``dtype``,
            ``layout``).

    Returns:
        :class:`BatchResult`, items in the order of ``sources``.

    Raises:
        BatchConversionError: some sources failed (with ``raise_on_failure``); ``fields['failures']`` names them.
        InvalidConfigError: no sources, ``jobs`` < 1, two sources with the same output name, bad options.
        OutputExistsError: the summary files exist and ``overwrite`` is false (checked before any work).

    Example:
        >>> result = to_lora_many(["runs/a", "runs/b"], "converted", jobs=2, max_rank=16)
        >>> [item.destination for item in result.items]
        ['converted/a', 'converted/b']
    """
    from adaconvert.conversion.peft_lora import check_layout
    from adaconvert.conversion.pipeline import check_options

    sources = [str(s) for s in sources]
    if not sources:
        raise InvalidConfigError("no sources to convert")
    if jobs < 1:
        raise InvalidConfigError(f"--jobs must be at least 1, got {jobs}")
    check_options(**{k: options.get(k) for k in ("max_rank", "energy", "tol", "vllm_max_lora_rank", "dtype")})
    check_layout(options.get("layout", "compact"))
    unknown = set(options) - {"max_rank", "energy", "tol", "vllm_max_lora_rank", "dtype", "layout"}
    if unknown:
        raise InvalidConfigError(f"unknown to-lora option(s): {', '.join(sorted(unknown))}")
    output_dir = Path(output_dir)
    for name in (SUMMARY_JSON, SUMMARY_MD):
        check_output(output_dir / name, overwrite=overwrite, inputs=sources)
    destinations = [str(output_dir / name) for name in output_names(sources)]
    for dst in destinations:  # each conversion checks its own source; no output may overwrite another's either
        check_no_overlap(dst, sources)
    output_dir.mkdir(parents=True, exist_ok=True)

    jobs = min(jobs, len(sources))
    if jobs > (os.cpu_count() or 1):
        logger.warning("--jobs %d is more than the %d CPUs here; conversions will compete", jobs, os.cpu_count())
    start = time.perf_counter()
    tasks = [(src, dst, overwrite, options) for src, dst in zip(sources, destinations, strict=True)]
    items = _run(tasks, jobs=jobs, progress=progress)
    result = BatchResult(output_dir=str(output_dir), jobs=jobs, items=items, seconds=time.perf_counter() - start)
    _write_summary(result, output_dir, overwrite=overwrite)
    logger.info("converted %d of %d adapters", len(items) - len(result.failures), len(items))
    if raise_on_failure:
        result.raise_for_failures()
    return result


def _run(tasks: list[tuple], *, jobs: int, progress: bool) -> list[BatchItem]:
    """Convert every task, one torch thread per conversion: parallelism comes from ``jobs`` processes (the tensor
    ops of a conversion are small, and intra-op threads competing for busy cores slow them down many times)."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="to-lora", unit="adapter", disable=not progress)
    items: list[BatchItem | None] = [None] * len(tasks)
    if jobs == 1:
        with torch_threads(1):
            for i, task in enumerate(tasks):
                items[i] = convert_one(*task)
                bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(convert_one, *task): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    items[i] = future.result()
                except BrokenProcessPool as exc:  # a worker died (killed, out of memory): its task failed
                    src, dst = tasks[i][:2]
                    items[i] = BatchItem(src, dst, ok=False, error=f"worker process died ({exc})", error_type="Crash")
                bar.update()
    bar.close()
    for item in items:
        if item is not None and item.traceback:
            logger.debug("%s failed unexpectedly:\n%s", item.source, item.traceback)
    return [item for item in items if item is not None]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def convert_one(src: str, dst: str, overwrite: bool, options: dict) -> BatchItem:
    """Convert one source; never raises for a bad adapter: the error becomes the item's one-line ``error``."""
    from adaconvert.conversion.peft_lora import to_lora

    start = time.perf_counter()
    try:
        report = to_lora(src, dst, overwrite=overwrite, **options)
    except (AdaconvertError, OSError) as exc:
        return BatchItem(src, dst, ok=False, error=str(exc), error_type=type(exc).__name__, seconds=_since(start))
    except Exception as exc:  # a bug of ours, not a bad input: named with its type (traceback kept), batch goes on
        error = f"internal error {type(exc).__name__}: {exc}"
        item = BatchItem(src, dst, ok=False, error=error, error_type=type(exc).__name__, seconds=_since(start))
        item.traceback = traceback.format_exc()
        return item
    return BatchItem(
        src,
        dst,
        ok=True,
        modules=sum(1 for m in report.modules if m.rank_after),
        max_rank=report.max_rank,
        vllm_max_lora_rank=report.vllm_max_lora_rank,
        params_before=report.params_before,
        params_after=report.params_after,
        max_rel_error=report.max_rel_error,
        seconds=_since(start),
    )


def _since(start: float) -> float:
    return time.perf_counter() - start


def _write_summary(result: BatchResult, output_dir: Path, *, overwrite: bool) -> None:
    """Both summary files, published together (checked before the conversions; one that appeared since is only
    replaced with ``overwrite``)."""
    with atomic_output_files([output_dir / SUMMARY_JSON, output_dir / SUMMARY_MD], overwrite=overwrite) as temps:
        temps[0].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        temps[1].write_text("# Batch conversion\n\n" + result.table() + "\n", encoding="utf-8")
