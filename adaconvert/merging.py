"""``merge``: fold one or more adapters into the base weights, streamed block by block with bounded memory.

Plan first, then write: every adapter module is matched to exactly one base tensor of the right shape, and
every shard header is checked, before the first byte of output exists. Then each base tensor is read in row
blocks by worker threads, W' = W + Σ wᵢ·ΔWᵢ is computed in float32 for the blocks that have updates and cast to
the output dtype, and one writer puts every block at its fixed place in its output shard. Peak memory is a few
blocks per worker, whatever the model size.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from adaconvert.adapter import Adapter, LowRankDelta, output_dtype
from adaconvert.base.model import quantized_modules
from adaconvert.base.quantization import FOUR_BIT, check_bitsandbytes, requantized
from adaconvert.constants import MERGE_REPORT_NAME
from adaconvert.errors import (
    AdapterShapeError,
    InvalidConfigError,
    MissingTensorError,
    NonFiniteError,
    UnsupportedPlatformError,
)
from adaconvert.io.atomic import atomic_output_dir, check_output
from adaconvert.io.checkpoint import Checkpoint, TensorInfo, TensorReader, match_tensor, open_checkpoint
from adaconvert.io.parallel import imap_unordered
from adaconvert.process import paused_gc, peak_rss_bytes, torch_threads, usable_cpus
from adaconvert.readers import read_adapter
from adaconvert.transforms import strip_empty
from adaconvert.writers.sharded import Shard, ShardFiles, copy_side_files, parse_size, plan_shards

logger = logging.getLogger(__name__)

# float32 bytes per row block: each is one read, one hand-off to the writer and one write, and small enough that the
# blocks in flight stay in the CPU's caches (measured: 2 MiB beat 1 and 8 MiB on a 2-core, 32 MiB-L3 machine)
BLOCK_BYTES = 2 * 2**20
# blocks computed ahead of the writer. Working memory is about (PREFETCH_BLOCKS + 3) blocks per worker thread,
# whatever the model size.
PREFETCH_BLOCKS = 4
# default cap on worker threads: there is one writer, and measured here a worker computes blocks about as fast as
# the writer puts them into the page cache, so more than a few workers would only wait (and hold buffers)
MAX_DEFAULT_THREADS = 4
# fewest rows in a block (see row_blocks)
MIN_BLOCK_ROWS = 16
# the merge computes in float32: a larger weight cannot even be represented
_MAX_WEIGHT = torch.finfo(torch.float32).max
# output heads that share the input embedding matrix when tie_word_embeddings is set
_TIED_HEADS = ("lm_head", "embed_out")


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to merge and the weight its ΔW is multiplied by."""

    source: str
    weight: float = 1.0


@dataclass(frozen=True)
class Update:
    """One adapter's contribution to one base tensor: W += weight · ΔW, or ΔWᵀ when the base stores (in, out)."""

    delta: LowRankDelta
    weight: float
    transpose: bool

    def add_rows_(self, out: torch.Tensor, start: int, stop: int) -> None:
        """``out += weight · (ΔW or ΔWᵀ)[start:stop]`` in place; ``out`` is float32 (stop - start, cols).

        One fused ``addmm`` (BLAS with β = 1): each element gets its dot product over the rank, then one addition,
        as ``W + B @ A`` does, without a ΔW block in memory.
        """
        A, B = self.delta.A, self.delta.B
        if self.transpose:
            out.addmm_(A[:, start:stop].T, B.T, alpha=self.weight)
        else:
            out.addmm_(B[start:stop], A, alpha=self.weight)


@dataclass
class MergeReport:
    """What a merge did. ``to_dict()`` is the ``--json`` output and ``merge_report.json``."""

    base: str
    destination: str
    adapters: list[dict]
    dtype: str
    shards: int
    tensors: int
    tensors_touched: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int | None
    files_copied: list[str] = field(default_factory=list)
    requantized: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """One line of what was merged, written and measured (and one on the requantisation)."""
        weights = ", ".join(f"{a['source']} ×{a['weight']:g} ({a['modules']} modules)" for a in self.adapters)
        rss = f", peak RSS {self.peak_rss_bytes / 2**20:,.0f} MiB" if self.peak_rss_bytes else ""
        text = (
            f"wrote {self.destination}: {self.tensors_touched} of {self.tensors} tensors merged from {weights}; "
            f"{self.bytes_written / 2**20:,.1f} MiB {self.dtype} in {self.shards} shard(s), {self.seconds:.1f} s{rss}"
        )
        if self.requantized:
            q = self.requantized
            text += f"\n{q['tensors']} quantised layers merged into their {q['method']} dequantisation"
        return text


def parse_adapter_spec(spec: str | Path | tuple | AdapterSpec) -> AdapterSpec:
    """``path``, ``path:0.5`` or ``(path, 0.5)`` → :class:`AdapterSpec`. A path that exists as given wins over the
    ``:weight`` reading, so directories with a colon in their name still work.

    Raises:
        InvalidConfigError: the weight is not a finite number.
    """
    if isinstance(spec, AdapterSpec):
        source, weight = spec.source, spec.weight
    elif isinstance(spec, tuple):
        source, weight = str(spec[0]), spec[1]
    else:
        source, weight = str(spec), 1.0
        head, sep, tail = source.rpartition(":")
        if sep and head and not Path(source).exists():
            with contextlib.suppress(ValueError):  # not a number: the colon is part of the name
                source, weight = head, float(tail)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not abs(weight) <= _MAX_WEIGHT:
        raise InvalidConfigError(
            f"adapter weight must be a finite number of at most {_MAX_WEIGHT:.3g} in magnitude (float32), got "
            f"{weight!r}",
            path=source,
        )
    return AdapterSpec(source=source, weight=float(weight))


def merge(
    base: str | Path,
    adapters: str | Path | Sequence[str | Path | tuple | AdapterSpec],
    dst: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    threads: int | None = None,
    requantize: str | None = None,
    double_quant: bool = True,
) -> MergeReport:
    """Merge adapters into a base model and write a complete checkpoint that transformers and vLLM load.

    W' = W + Σᵢ wᵢ · ΔWᵢ for every adapted module (ΔW = B @ A, (out, in); transposed for ``fan_in_fan_out``
    bases such as GPT-2's Conv1D), computed in float32 and cast to the base dtype (or ``dtype``). The base is read
    in row blocks and the output written the same way, so peak memory does not grow with the model. Output is
    atomic: safetensors shards (+ index), the base's config, generation config and tokenizer files, and
    ``merge_report.json``.

    Args:
        base: model directory or Hub repo id, with ``model.safetensors`` or a sharded index.
        adapters: AdaLoRA / LoRA / LoRA-Drop directories or repo ids; ``"path:0.5"`` or ``(path, 0.5)`` weights one.
        dst: output directory; must not exist unless ``overwrite``.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for every floating tensor; default: as in the base.
        max_shard_size: bytes per output shard, an int or a string like ``5GB`` / ``2GiB``.
        overwrite: replace an existing ``dst`` (only once the new one is complete).
        progress: show a progress bar over bytes on stderr.
        threads: worker threads (default: one per usable CPU, at most ``MAX_DEFAULT_THREADS``). Each uses one torch
            thread; the output is the same bits whatever the count.
        requantize: ``nf4`` or ``fp4``: the QLoRA-faithful merge, for adapters trained on a base loaded
            in that bitsandbytes quantisation. Every layer that quantisation covers becomes dequant(quant(W)) (in the
            base's dtype; :func:`adaconvert.base.quantization.requantized`, whole tensors) before ΔW is added,
            adapted or not, so the merged model computes what the adapter was trained against.
        double_quant: with a 4-bit ``requantize``, whether training used double quantisation (QLoRA's default).

    Returns:
        A :class:`MergeReport`.

    Raises:
        OutputExistsError: ``dst`` exists and ``overwrite`` is false.
        MissingTensorError: an adapter module has no base tensor (or several candidates).
        AdapterShapeError: a base tensor's shape does not fit its module (adapter for another base?).
        InvalidConfigError: bad weight, dtype or shard size; an adapter on a head tied to the embeddings.
        CorruptCheckpointError, SourceNotFoundError: unreadable base or adapter.
        NonFiniteError: a merged tensor holds NaN or Inf.

    Example:
        >>> report = merge("meta-llama/Llama-3.1-8B", ["runs/adalora-lora"], "runs/merged", dtype="bfloat16")
        >>> report.tensors_touched
        224
    """
    started = time.perf_counter()
    require_positioned_io()
    specs = [parse_adapter_spec(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not specs:
        raise InvalidConfigError("give at least one adapter to merge")
    inputs = [base, *(s.source for s in specs)]
    dst = check_output(dst, overwrite=overwrite, inputs=inputs)
    shard_bytes = parse_size(max_shard_size)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidConfigError(f"threads must be a positive integer, got {threads!r}")
    override = output_dtype(dtype)
    if requantize is not None:
        if requantize not in FOUR_BIT:
            raise InvalidConfigError(
                f"--requantize must be one of {', '.join(FOUR_BIT)}, got {requantize!r}; an int8 (LLM.int8()) base "
                "also quantises activations, which no merged model reproduces: merge without --requantize"
            )
        check_bitsandbytes(requantize)

    checkpoint = open_checkpoint(base)
    loaded = [(spec, strip_empty(read_adapter(spec.source))) for spec in specs]
    for spec, adapter in loaded:
        if not adapter.deltas:
            logger.warning("%s has no non-zero update: it changes nothing", spec.source)
    updates = plan_updates(checkpoint, loaded)
    requantized_names = _requantized_tensors(checkpoint, requantize) if requantize else {}
    layout = [(name, _output_dtype(info.dtype, override), info.shape) for name, info in checkpoint.tensors.items()]
    shards = plan_shards(layout, shard_bytes)

    with atomic_output_dir(dst, overwrite=overwrite, inputs=inputs) as tmp:
        write_merged(
            tmp,
            checkpoint,
            shards,
            updates,
            progress=progress,
            threads=threads,
            requant=RequantSpec(requantize, double_quant, requantized_names) if requantize else None,
        )
        copied = copy_side_files(checkpoint.root, tmp, dtype=override)
        report = MergeReport(
            base=str(base),
            destination=str(dst),
            adapters=[
                {"source": s.source, "weight": s.weight, "kind": a.source_kind, "modules": len(a.deltas)}
                for s, a in loaded
            ],
            dtype=str(override or _main_dtype(checkpoint)).removeprefix("torch."),
            shards=len(shards),
            tensors=len(layout),
            tensors_touched=len(updates),
            requantized=None
            if requantize is None
            else {"method": requantize, "double_quant": double_quant, "tensors": len(requantized_names)},
            bytes_written=sum(s.nbytes for s in shards),
            seconds=round(time.perf_counter() - started, 3),
            peak_rss_bytes=peak_rss_bytes(),
            files_copied=copied,
        )
        (tmp / MERGE_REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s: %d of %d tensors merged, %d shard(s)", dst, len(updates), len(layout), len(shards))
    return report


def require_positioned_io() -> None:
    """The streamed merge reads and writes at offsets from several threads (``os.preadv`` / ``os.pwrite``): POSIX
    systems (Linux, macOS, the BSDs) have them, Windows does not.

    Raises:
        UnsupportedPlatformError: on a platform without them, before anything is read or written.
    """
    missing = [name for name in ("preadv", "pwrite") if not hasattr(os, name)]
    if missing:
        raise UnsupportedPlatformError(
            f"merge needs positioned file I/O (os.{', os.'.join(missing)}), which {sys.platform} lacks; "
            "run it on Linux or macOS (WSL works on Windows)"
        )


def write_merged(
    directory: Path,
    checkpoint: Checkpoint,
    shards: Sequence[Shard],
    updates: dict[str, list[Update]],
    *,
    progress: bool,
    threads: int | None = None,
    requant: RequantSpec | None = None,
) -> None:
    """Write every tensor of ``checkpoint``, with ``updates`` added, into ``shards`` in ``directory``; the tensors
    ``requant`` names are requantised first (whole, :class:`WholeTensor`).

    The output is cut into tasks of rows (:func:`plan_tasks`) that ``threads`` workers read and compute ahead, in
    file order; this thread writes each one at its fixed place in the output. One writer, because a filesystem
    serialises writes to a file anyway: two threads writing would wait on each other instead of computing. Each
    worker keeps to one torch thread: the blocks are small, and two levels of threads would fight over the cores.
    torch's thread count is process-wide: other torch work in this process sees 1 thread until the merge ends.
    """
    from tqdm.auto import tqdm

    workers = threads or min(usable_cpus(), MAX_DEFAULT_THREADS)
    if requant is not None:  # a worker requantising a tensor holds up the others, which wait for its blocks
        requant = replace(requant, threads=workers)
    tasks = plan_tasks(checkpoint, shards, updates, requant)
    computed = [t for t in tasks if t.updates or t.requant or t.out_dtype != t.info.dtype]
    sizes = {
        "in_bytes": max((t.numel * t.info.dtype.itemsize for t in computed), default=0),
        "out_bytes": max((t.nbytes for t in tasks), default=0),
        "work_numel": max((t.numel for t in computed), default=0),
    }
    n_threads = max(1, min(workers, len(tasks) or 1))
    with (
        ShardFiles(directory, shards) as files,
        TensorReader() as reader,
        torch_threads(1),
        paused_gc(),
        tqdm(
            total=sum(s.nbytes for s in shards),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="merge",
            disable=not progress,
        ) as bar,
    ):

        def make_worker():
            return BlockMerger(reader, ring=PREFETCH_BLOCKS + 2, **sizes).run

        for task, data in imap_unordered(make_worker, tasks, threads=n_threads, depth=PREFETCH_BLOCKS):
            bar.update(files.write(task.info.name, task.out_begin, data))


def plan_updates(checkpoint: Checkpoint, adapters: Sequence[tuple[AdapterSpec, Adapter]]) -> dict[str, list[Update]]:
    """Base tensor name → the updates to add to it, in adapter order; every module checked against the base.

    Each module must match exactly one floating-point base tensor (see
    :func:`~adaconvert.io.checkpoint.match_tensor`) whose shape is ΔW's (out, in), or (in, out) for
    ``fan_in_fan_out``. All problems of an adapter are collected; the first is raised with a count of the others.

    Raises:
        MissingTensorError, AdapterShapeError, InvalidConfigError (tied output head).
    """
    plan: dict[str, list[Update]] = {}
    for spec, adapter in adapters:
        problems: list[tuple[type, str, str]] = []
        claimed: dict[str, str] = {}
        for module, delta in adapter.deltas.items():
            problem = _check_module(checkpoint, module, delta, adapter.fan_in_fan_out, claimed)
            if problem:
                problems.append((*problem, module))
                continue
            plan.setdefault(claimed[module], []).append(
                Update(delta=delta, weight=spec.weight, transpose=adapter.fan_in_fan_out)
            )
        if problems:
            cls, message, module = problems[0]
            more = f" (and {len(problems) - 1} more module(s) that do not fit)" if len(problems) > 1 else ""
            raise cls(f"{message}{more}", path=spec.source, module=module)
    return {name: plan[name] for name in checkpoint.tensors if name in plan}


def _check_module(checkpoint, module, delta, fan_in_fan_out, claimed) -> tuple[type, str] | None:
    """None when ``module`` fits one base tensor (recorded in ``claimed``), else (error class, message)."""
    if checkpoint.tie_word_embeddings and module.rsplit(".", 1)[-1] in _TIED_HEADS:
        return InvalidConfigError, (
            f"the base ties {module} to the input embeddings (tie_word_embeddings=true), so merging it would change "
            "the embeddings too; train the adapter without it, or untie the base first"
        )
    candidates = match_tensor(module, checkpoint.tensors)
    if len(candidates) != 1:
        found = f"several candidates ({', '.join(candidates)})" if candidates else "no tensor"
        return MissingTensorError, f"base {checkpoint.root} has {found} for {module}.weight"
    info = checkpoint.tensors[candidates[0]]
    expected = (delta.in_features, delta.out_features) if fan_in_fan_out else (delta.out_features, delta.in_features)
    if info.shape != expected:
        return AdapterShapeError, (
            f"base tensor {info.name} has shape {list(info.shape)} but the adapter's update is {list(expected)}"
            f"{' (fan_in_fan_out)' if fan_in_fan_out else ''}; is the adapter for another base model?"
        )
    if not info.dtype.is_floating_point:
        return InvalidConfigError, f"base tensor {info.name} is {info.dtype}; quantized bases cannot be merged into"
    if info.name in claimed.values():
        other = next(m for m, t in claimed.items() if t == info.name)
        return InvalidConfigError, f"modules {other} and {module} both map to base tensor {info.name}"
    claimed[module] = info.name
    return None


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of a base tensor to compute: read (or take from ``requant``), add ``updates``, cast to
    ``out_dtype``, write."""

    info: TensorInfo
    out_dtype: torch.dtype
    updates: tuple[Update, ...]
    start: int
    stop: int
    requant: WholeTensor | None = None

    @property
    def numel(self) -> int:
        return (self.stop - self.start) * _row_numel(self.info)

    @property
    def nbytes(self) -> int:
        """Output bytes."""
        return self.numel * self.out_dtype.itemsize

    @property
    def out_begin(self) -> int:
        """Where the block's bytes start in the output tensor's data."""
        return self.start * _row_numel(self.info) * self.out_dtype.itemsize


def plan_tasks(
    checkpoint: Checkpoint,
    shards: Sequence[Shard],
    updates: dict[str, list[Update]],
    requant: RequantSpec | None = None,
) -> list[RowBlock]:
    """The whole output as row blocks (:func:`row_blocks`), in file order; blocks of a requantised tensor share
    one :class:`WholeTensor`."""
    tasks = []
    pool = None
    if requant is not None and requant.tensors:
        pool = BufferPool(max(checkpoint.tensors[name].nbytes for name in requant.tensors))
    for shard in shards:
        for name, out_dtype, _ in shard.layout:
            info = checkpoint.tensors[name]
            blocks = row_blocks(info)
            whole = None
            if requant is not None and name in requant.tensors:
                whole = WholeTensor(info, requant, transposed=requant.tensors[name], blocks=len(blocks), pool=pool)
            tasks += [RowBlock(info, out_dtype, tuple(updates.get(name, ())), a, b, whole) for a, b in blocks]
    return tasks


@dataclass(frozen=True)
class RequantSpec:
    """The QLoRA-faithful merge: ``tensors`` (name → stored transposed, as Conv1D) become dequant(quant(W)) by
    ``method`` (``nf4`` or ``fp4``) before the updates are added, each quantised by ``threads`` threads."""

    method: str
    double_quant: bool
    tensors: dict[str, bool]
    threads: int = 1


class WholeTensor:
    """dequant(quant(W)) of one base tensor, computed once from the whole tensor and handed out in row blocks.

    Whole, because 4-bit blocks run along the flattened weight and double quantisation subtracts the mean of all
    the tensor's block scales: a chunk quantised alone would get other scales. The first block asked for reads and
    requantises the tensor (the others wait on the lock), in a buffer of ``pool``; the buffer goes back to the pool
    once its last block is copied out, so only the tensors whose blocks are in flight are held, a few at a time.
    """

    def __init__(self, info: TensorInfo, spec: RequantSpec, *, transposed: bool, blocks: int, pool: BufferPool):
        self.info, self.spec, self.transposed, self.pool = info, spec, transposed, pool
        self._left = blocks
        self._buffer: torch.Tensor | None = None
        self._value: torch.Tensor | None = None
        self._lock = threading.Lock()

    def copy_rows_(self, reader: TensorReader, start: int, stop: int, work: torch.Tensor) -> None:
        """Copy rows [start, stop) of dequant(quant(W)) into ``work`` (converted to its dtype)."""
        with self._lock:
            if self._value is None:
                info = self.info
                self._buffer = self.pool.take()
                raw = reader.read_into(info, 0, info.nbytes, self._buffer)
                weight = raw.view(info.dtype).view(info.shape)
                spec = self.spec
                self._value = requantized(
                    weight,
                    spec.method,
                    double_quant=spec.double_quant,
                    transposed=self.transposed,
                    threads=spec.threads,
                    in_place=True,  # the buffer just read is ours
                )
            value = self._value
        work.copy_(value[start:stop])
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._value = None
                self.pool.give(self._buffer)


class BufferPool:
    """Byte buffers of ``nbytes`` each, handed out and taken back: reading a whole tensor into memory freshly
    allocated faults its pages in one by one, which measured slower than the merge's whole compute (2.6 s against
    2.3 s of requantisation for 3.4 GB of bfloat16)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
        return torch.empty(self.nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)


def _requantized_tensors(checkpoint: Checkpoint, method: str) -> dict[str, bool]:
    """{base tensor: stored transposed} for every layer loading the base quantised by ``method`` converts.

    Raises:
        MissingTensorError: a quantised layer has no (or no single) weight tensor in the checkpoint.
    """
    found = {}
    for module, transposed in quantized_modules(checkpoint.config).items():
        candidates = match_tensor(module, checkpoint.tensors)
        if len(candidates) != 1:
            raise MissingTensorError(f"no single weight tensor for layer {module}", path=checkpoint.root)
        found[candidates[0]] = transposed
    logger.info("%d tensors requantised by %s before merging", len(found), method)
    return found


class BlockMerger:
    """Computes row blocks for one worker thread, with buffers of its own allocated once: none per block.

    A row block is read into ``raw`` (base dtype), upcast into the float32 ``work`` buffer, gets every update added
    in order, is checked, and is cast into the next of ``ring`` output buffers, returned as bytes. Blocks are
    small (``BLOCK_BYTES``) so that they stay in the CPU's caches through these passes and the write. An output
    buffer is reused ``ring`` blocks later: the consumer must be done with it by then (``imap_unordered`` with
    ``depth = ring - 2`` guarantees it).
    """

    def __init__(self, reader: TensorReader, *, ring: int, in_bytes: int, out_bytes: int, work_numel: int):
        self.reader = reader
        self._raw = torch.empty(in_bytes, dtype=torch.uint8)
        self._work = torch.empty(work_numel, dtype=torch.float32)
        self._ring = [torch.empty(out_bytes, dtype=torch.uint8) for _ in range(ring)]
        self._turn = 0

    def run(self, task: RowBlock) -> memoryview:
        """The output bytes of ``task``; those of a block neither merged nor cast are read straight into the output
        buffer.

        Raises:
            NonFiniteError: a merged block holds NaN/Inf, or the cast to the output dtype overflows.
            CorruptCheckpointError: a base file ended early.
        """
        info, out_dtype, numel = task.info, task.out_dtype, task.numel
        out = self._ring[self._turn % len(self._ring)][: task.nbytes]
        self._turn += 1
        if not task.updates and not task.requant and out_dtype == info.dtype:  # copied as it is
            return memoryview(self.reader.read_into(info, task.start * info.row_nbytes, task.nbytes, out).numpy())
        shape = (task.stop - task.start, *info.shape[1:]) if info.shape else ()
        work = self._work[:numel].view(shape)
        if task.requant is not None:
            task.requant.copy_rows_(self.reader, task.start, task.stop, work)
        else:
            raw = self.reader.read_into(info, task.start * info.row_nbytes, numel * info.dtype.itemsize, self._raw)
            work.copy_(raw.view(info.dtype).view(shape))
        for update in task.updates:
            update.add_rows_(work, task.start, task.stop)
        if out_dtype.is_floating_point:
            _check_finite(work, out_dtype, task)
        out.view(out_dtype).view(shape).copy_(work)
        return memoryview(out.numpy())


def row_blocks(info: TensorInfo) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering ``info``: about ``BLOCK_BYTES`` of float32 each, a multiple of
    ``MIN_BLOCK_ROWS`` rows, a short tail joined to the block before it.

    Why a minimum: BLAS takes another code path (gemv-like) for a matrix product of fewer than 4 rows, whose
    roundings differ from the full product's; blocks of 16 rows or more give the bits ``W + B @ A`` gives.
    """
    rows = info.shape[0] if info.shape else 1
    if _row_numel(info) == 0:  # an empty tensor ([4, 0], [0, 8]): one block of no bytes
        return [(0, rows)]
    step = BLOCK_BYTES // (4 * _row_numel(info))
    step = max(MIN_BLOCK_ROWS, step - step % MIN_BLOCK_ROWS)
    blocks, start = [], 0
    while start < rows:
        stop = rows if rows - start < step + MIN_BLOCK_ROWS else start + step
        blocks.append((start, stop))
        start = stop
    return blocks


def _check_finite(work: torch.Tensor, out_dtype: torch.dtype, task: RowBlock) -> None:
    """NaN/Inf in the float32 block, or values the cast to ``out_dtype`` would turn into ±Inf: one ``aminmax`` pass
    (NaN propagates into both ends; rounding is monotonic, so if the extremes stay finite in ``out_dtype``, all
    values do). ``torch.isfinite(t).all()`` would be some 20× slower on CPU."""
    if work.numel() == 0:
        return
    lo, hi = (x.item() for x in torch.aminmax(work))
    where = f"(rows {task.start}-{task.stop - 1})"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        if task.updates:
            raise NonFiniteError(f"merged tensor {task.info.name} holds NaN or Inf {where}")
        return  # a base tensor that already holds Inf (masks, buffers) is cast as it is
    if hi >= _overflow_bound(out_dtype) or lo <= -_overflow_bound(out_dtype):
        merged = "merged " if task.updates else ""
        raise NonFiniteError(f"{merged}tensor {task.info.name} overflows {out_dtype} {where}")


@functools.cache
def _overflow_bound(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to Inf when a float32 is cast to ``dtype`` (inf for float32 itself).

    Round-to-nearest-even sends everything from ``max`` + half an ulp up to Inf (``max``'s last mantissa bit is
    odd, so the tie goes up too).
    """
    info = torch.finfo(dtype)
    if info.bits >= 32:
        return math.inf
    half_ulp = info.eps * 2.0 ** math.floor(math.log2(info.max)) / 2
    return info.max + half_ulp


def _row_numel(info: TensorInfo) -> int:
    return math.prod(info.shape[1:]) if info.shape else 1


def _output_dtype(dtype: torch.dtype, override: torch.dtype | None) -> torch.dtype:
    return override if override is not None and dtype.is_floating_point else dtype


def _main_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The dtype holding most bytes of the checkpoint."""
    totals: dict[torch.dtype, int] = {}
    for info in checkpoint.tensors.values():
        totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
    return max(totals, key=totals.get) if totals else torch.float32
