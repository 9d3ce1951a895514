"""Write a safetensors file tensor by tensor, without holding the file's tensors in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte offsets),
then the raw bytes of every tensor. The header depends only on names, dtypes and shapes, so it can be written
before any data: each tensor is then appended as it is produced and can be dropped once written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}

TensorSpec = tuple[str, torch.dtype, Sequence[int]]


class Rows(Protocol):
    """A 2-D float32 tensor produced in blocks of rows: its ``shape`` and ``rows(start, stop)`` → (stop - start,
    cols), computed into ``out`` (a float32 (stop - start, cols) view, any strides) when one is given; ``view``:
    the rows are views of memory that exists already, nothing is computed."""

    shape: tuple[int, int]
    view: bool

    def rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor: ...


_BUFFER_BYTES = 4 << 20  # write_padded's reused buffer: large enough for few writes, small enough for the caches
_BATCH_BYTES = 2 << 20  # tensors go to the writing thread in batches of at least this: a hand-over costs ~45 µs
_IN_FLIGHT = 3  # batches handed to the writing thread and not yet written: bounds the memory they hold
_TURNS = 3  # write_padded's buffers per dtype and width, used in turn: one is filled while the others are written


@dataclass
class _PadBuffer:
    """One of :meth:`SafetensorsWriter.write_padded`'s buffers: any non-zero value lies in its first
    ``dirty_rows`` rows and ``dirty`` columns."""

    data: torch.Tensor
    dirty: int = 0
    dirty_rows: int = 0
    written: Future | None = None  # the write of its last data, which must end before the buffer is reused

    def __post_init__(self):
        self.bytes = byte_view(self.data)  # made once, not per block (448 blocks in an 8B-shaped mlx-lm export)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as they are in memory (no copy; it keeps ``tensor`` alive)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def tensor_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * dtype.itemsize


def build_header(layout: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) for tensors laid out in ``layout`` order.

    The JSON is padded with spaces to a multiple of 8 bytes so that tensor data stays aligned, as the reference
    implementation does.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in layout:
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def open_for_writing(path: Path):
    """``path`` opened for writing, empty: a new file, or an existing one opened without truncating it when it is
    empty already.

    Callers publish atomically (``io.atomic``) and hand the writer the empty temporary file they created. Opened
    with ``"wb"``, ext4 sees an existing file truncated and rewritten, and on close starts writing all of it back to
    disk before ``close`` returns (``auto_da_alloc``, there for programs that replace a file in place without
    fsync): 50 ms of a 160 MiB export, which the rename into place does not need.
    """
    try:
        file = open(path, "r+b")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        return open(path, "wb")
    if os.fstat(file.fileno()).st_size:
        file.truncate()  # as "wb" would: nothing old may remain
    return file


class SafetensorsWriter:
    """Streams tensors into ``path`` in the order of ``layout``.

    The bytes are written by a thread of the writer's own while the caller computes the next tensor (a write
    and a torch operation both release the GIL), in batches of at least ``_BATCH_BYTES``, at most ``_IN_FLIGHT``
    of them waiting. Each tensor goes to its offset in the file, which the layout fixes; a failed write is raised
    by a later call, or by ``close``. A tensor handed to :meth:`write` or :meth:`write_padded` may therefore be
    read after the call returns: it must not change before ``close``.

    Example:
        >>> with SafetensorsWriter(path, [("w", torch.float32, (2, 3))]) as w:
        ...     w.write("w", torch.zeros(2, 3))
    """

    def __init__(self, path: str | Path, layout: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._layout = [(n, d, tuple(s)) for n, d, s in layout]
        self._next = 0
        # write_padded's buffers, _TURNS per (dtype, width) used in turn (one is filled while the others are
        # written): a writer that alternates widths (mlx-lm's (in, R) lora_a and (R, out) lora_b) would otherwise
        # allocate, and page-fault, a fresh one on every call
        self._buffers: dict[tuple[torch.dtype, int], deque[_PadBuffer]] = {}
        self._tallest: dict[tuple[torch.dtype, int], int] = {}  # (dtype, width) → most rows of a tensor of the layout
        for _, dtype, shape in self._layout:
            if len(shape) == 2:
                key = (dtype, shape[1])
                self._tallest[key] = max(self._tallest.get(key, 0), shape[0])
        self._file = open_for_writing(self.path)
        header = self._header(metadata)
        self._file.write(header)
        self._file.flush()
        self._offset = len(header)  # where the next bytes go; past the end of the file after a hole
        self._pending: deque[Future] = deque()
        self._batch: list[tuple[int, memoryview]] = []  # (offset, bytes) not yet handed to the thread
        self._batch_bytes = 0
        self._batch_written: Future = Future()  # ends when the current batch is written
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="safetensors-writer")

    def _header(self, metadata) -> bytes:
        """Everything before the first tensor's data (a subclass for another format overrides it)."""
        return build_header(self._layout, metadata)

    def _tensor_done(self, nbytes: int) -> None:
        """Called after the ``nbytes`` of each tensor: a format that aligns tensor data pads here."""

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; it must be the next one of the layout, with the announced dtype and shape."""
        self._announced(name, tensor.dtype, tuple(tensor.shape))
        self._write_tensor(tensor.detach().to("cpu").contiguous())
        self._tensor_done(tensor_nbytes(tensor.dtype, tensor.shape))
        self._next += 1

    def write_padded(self, name: str, tensor: torch.Tensor | Rows, dtype: torch.dtype, shape: tuple[int, int]) -> None:
        """Append ``tensor`` cast to ``dtype`` and zero-padded at the end of each dimension to ``shape``, which the
        layout announced. ``tensor`` is 2-D, any strides (a transposed view is fine), or a :class:`Rows` that
        computes it block by block (a folded factor: ``adapter.Factor``).

        The padded tensor is never built whole: rows go through a few reused buffers of up to a few MiB per row width,
        whose memory is touched once (a fresh allocation per tensor costs a page fault per 4 KiB, more than the
        copy itself); padding rows are not written at all (:meth:`_skip`).
        """
        self._announced(name, dtype, tuple(shape))
        rows, cols = tensor.shape
        if rows > shape[0] or cols > shape[1]:
            raise ValueError(f"{self.path}: {name} {list(tensor.shape)} does not fit in {list(shape)}")
        whole = isinstance(tensor, torch.Tensor)
        if whole and (cols, tensor.dtype) == (shape[1], dtype) and tensor.is_contiguous():
            self._write_tensor(tensor)
        elif rows:
            step = max(1, _BUFFER_BYTES // max(1, shape[1] * dtype.itemsize))
            # a padded layout has few row widths (_TURNS buffers each); unpadded rows, one width per rank, are
            # computed into fresh memory the size of a module instead
            padded = (rows, cols) != tuple(shape)
            for start in range(0, rows, step):
                n = min(step, rows - start)
                if padded and not whole and dtype == torch.float32 and not tensor.view:
                    pad = self._buffer(dtype, shape[1], step, n, cols)
                    tensor.rows(start, start + n, out=pad.data[:n, :cols])  # computed in place: no new memory
                else:
                    block = tensor[start : start + n] if whole else tensor.rows(start, start + n)
                    if (cols, block.dtype) == (shape[1], dtype) and block.is_contiguous():
                        self._write_tensor(block)  # computed just now, in its final form (or a view of the file)
                        continue
                    pad = self._buffer(dtype, shape[1], step, n, cols)
                    pad.data[:n, :cols].copy_(block)
                pad.written = self._write_bytes(pad.bytes[: n * shape[1] * dtype.itemsize])
                self._hand_over()  # now: the buffer's turn comes again after the others', and waits for this write
        self._skip((shape[0] - rows) * shape[1] * dtype.itemsize)
        self._tensor_done(tensor_nbytes(dtype, shape))
        self._next += 1

    def _write_tensor(self, tensor: torch.Tensor) -> Future:
        """The bytes of a contiguous CPU tensor, as they are in memory, for the writing thread (which keeps
        ``tensor`` alive until they are written); the future ends when they are."""
        return self._write_bytes(byte_view(tensor))

    def _write_bytes(self, data: memoryview) -> Future:
        """``data`` at the next offset, for the writing thread; the future ends when it is written."""
        self._batch.append((self._offset, data))
        self._offset += len(data)
        self._batch_bytes += len(data)
        written = self._batch_written
        if self._batch_bytes >= _BATCH_BYTES:
            self._hand_over()
        return written

    def _hand_over(self) -> None:
        """The current batch to the writing thread, once fewer than ``_IN_FLIGHT`` wait for it."""
        if not self._batch:
            return
        while len(self._pending) >= _IN_FLIGHT:
            self._pending.popleft().result()  # raises a failed write's error
        batch, written = self._batch, self._batch_written
        self._batch, self._batch_bytes, self._batch_written = [], 0, Future()
        self._pending.append(self._thread.submit(self._write_batch, batch, written))

    def _announced(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if self._next >= len(self._layout):
            raise ValueError(f"{self.path}: tensor {name!r} was not announced in the header")
        exp_name, exp_dtype, exp_shape = self._layout[self._next]
        if (name, dtype, shape) != (exp_name, exp_dtype, exp_shape):
            raise ValueError(
                f"{self.path}: expected {exp_name} {exp_dtype} {list(exp_shape)}, got {name} {dtype} {list(shape)}"
            )

    def _buffer(self, dtype: torch.dtype, width: int, step: int, rows: int, cols: int) -> _PadBuffer:
        """A buffer of ``dtype`` and ``width`` for blocks of up to ``step`` rows (allocated once, as tall as the
        layout's tallest tensor of that width needs), whose columns from ``cols`` on are zero and whose earlier
        data is written: the caller sets the first ``cols`` columns of its first ``rows`` rows, nothing else,
        before the next call of the same dtype and width."""
        turns = self._buffers.setdefault((dtype, width), deque())
        if len(turns) < _TURNS:
            tallest = min(step, self._tallest[dtype, width])
            turns.appendleft(_PadBuffer(torch.zeros((tallest, width), dtype=dtype)))
        turns.rotate(-1)
        buffer = turns[-1]
        if buffer.written is not None:  # handed over as it was filled (write_padded)
            buffer.written.result()
        if buffer.dirty > cols:  # data columns of earlier calls, in the rows they used
            buffer.data[: buffer.dirty_rows, cols : buffer.dirty].zero_()
        buffer.dirty, buffer.dirty_rows = cols, max(buffer.dirty_rows, rows)
        return buffer

    def _skip(self, nbytes: int) -> None:
        """``nbytes`` zero bytes, as a hole: the file is new and empty (``open_for_writing``), so the file system
        reads zeros there without writing any (``close`` sets the length when the file ends in one)."""
        self._offset += nbytes

    def _write_batch(self, batch: list[tuple[int, memoryview]], written: Future) -> None:
        """In the writing thread, the only one to use the file until ``close``."""
        try:
            for offset, data in batch:
                self._file.seek(offset)
                self._file.write(data)
        except BaseException as exc:
            written.set_exception(exc)
            raise
        written.set_result(None)

    def _finish(self) -> None:
        """Wait for every write (raising the first failure) and stop the writing thread."""
        try:
            self._hand_over()
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._thread.shutdown(cancel_futures=True)

    def close(self) -> None:
        try:
            self._finish()
            self._file.truncate(self._offset)  # the file's length, past a hole at its end
        finally:
            self._file.close()
        if self._next != len(self._layout):
            missing = [n for n, _, _ in self._layout[self._next :]]
            raise ValueError(f"{self.path}: {len(missing)} announced tensor(s) never written, first {missing[0]!r}")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self._finish()
        except OSError:
            pass  # the caller's exception is the one raised
        finally:
            self._file.close()


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
    """Write a dict of tensors as one safetensors file, one tensor at a time (no whole-file buffer)."""
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(path, layout, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
