"""Helpers shared by the readers: grouping state-dict keys per module, and the checks every tensor gets."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.adapter import LowRankDelta
from adaconvert.constants import PEFT_PREFIX
from adaconvert.errors import CorruptCheckpointError, InvalidConfigError, MissingTensorError, NonFiniteError
from adaconvert.scaling import pattern_error


def group_by_module(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], *, path: Path, hint: str = ""
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {suffix: tensor}}`` from PEFT keys ``base_model.model.<module>.<suffix>``.

    Every module must have every suffix; a key of any other form is an error (it would be dropped silently
    otherwise), with ``hint`` appended to say what is supported.

    Raises:
        CorruptCheckpointError: a key does not have the expected form.
        MissingTensorError: a module lacks one of ``suffixes``.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            raise CorruptCheckpointError(
                f"unexpected tensor {key!r}; expected base_model.model.<module>.{{{','.join(suffixes)}}}{hint}",
                path=path,
            )
        module = key[len(PEFT_PREFIX) : -len(suffix) - 1]
        modules.setdefault(module, {})[suffix] = tensor
    for module, parts in modules.items():
        missing = [s for s in suffixes if s not in parts]
        if missing:
            raise MissingTensorError(f"missing {', '.join(missing)}", path=path, module=module)
    return modules


def check_finite(module: str, parts: dict[str, torch.Tensor], *, path: Path) -> dict[str, float]:
    """The largest magnitude of each tensor of ``parts`` (0 for an empty or non-floating one); raise NonFiniteError
    naming the first that holds NaN or Inf.

    min and max propagate NaN and reach ±Inf, so one fast reduction per tensor decides it.
    """
    magnitudes = {}
    for suffix, tensor in parts.items():
        magnitudes[suffix] = 0.0
        if tensor.is_floating_point() and tensor.numel():
            low, high = (float(x) for x in torch.aminmax(tensor))
            if not (math.isfinite(low) and math.isfinite(high)):
                raise NonFiniteError(f"{suffix} holds NaN or Inf values", path=path, module=module)
            magnitudes[suffix] = max(-low, high)
    return magnitudes


def finite_magnitude(tensors: dict[str, torch.Tensor]) -> float | None:
    """The largest magnitude in all of ``tensors`` when every value is finite, from one reduction over the file's
    data; None when that data is not one floating dtype laid back to back in one storage (tensors read by
    :func:`~adaconvert.io.source.load_tensors` from a safetensors file are), or holds NaN or Inf. On None, each
    module is checked on its own (:func:`check_finite`, which names the tensor that holds NaN or Inf).

    One ``aminmax`` over the whole data instead of one per tensor: for an 8B-shaped AdaLoRA (672 tensors,
    160 MiB) about 24 ms against 26-30 ms on one thread, and one task for :class:`ValueChecks`' thread.
    """
    values = list(tensors.values())
    if not values or not values[0].is_floating_point():
        return None
    dtype, storage = values[0].dtype, values[0].untyped_storage()
    spans = []
    for tensor in values:
        if (
            tensor.dtype != dtype
            or not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != storage.data_ptr()
        ):
            return None
        spans.append((tensor.storage_offset(), tensor.numel()))
    spans.sort()
    start = end = spans[0][0]
    for offset, numel in spans:
        if offset != end:  # a gap or an overlap: not the data of one file, back to back
            return None
        end += numel
    if end == start:
        return 0.0
    data = torch.empty(0, dtype=dtype).set_(storage, start, (end - start,))
    low, high = (float(x) for x in torch.aminmax(data))
    return max(-low, high) if math.isfinite(low) and math.isfinite(high) else None


def source_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype the adapter was saved in (float32 if it holds no tensor)."""
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


# --- typed config checks -------------------------------------------------------------------------------------------
# A check takes a JSON value and returns what is wrong with it (a phrase completing "field 'x' ..."), or None.
Check = Callable[[object], "str | None"]
REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One config field: its check, and its default when absent or null (``REQUIRED``: it must be present; PEFT
    writes null for "not set")."""

    check: Check
    default: object = None


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {_shown(value)}"


def integer(minimum: int | None = None) -> Check:
    def check(value):
        if not _is_int(value):
            return f"must be an integer, got {_shown(value)}"
        if minimum is not None and value < minimum:
            return f"must be at least {minimum}, got {value}"
        return None

    return check


def number(value) -> str | None:
    """A finite JSON number (int or float, not a bool, not Infinity/NaN)."""
    if not (_is_int(value) or isinstance(value, float)):
        return f"must be a number, got {_shown(value)}"
    return None if math.isfinite(value) else f"must be a finite number, got {value}"


def string(value) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {_shown(value)}"


def strings(value) -> str | None:
    """A string or a list of strings (``target_modules``, ``modules_to_save``)."""
    ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    return None if ok else f"must be a string or a list of strings, got {_shown(value)}"


def one_of(*checks: Check) -> Check:
    def check(value):
        problems = [c(value) for c in checks]
        if None in problems:
            return None
        return " or ".join(p.split(", got")[0] for p in problems) + f", got {_shown(value)}"

    return check


def pattern(values: Check) -> Check:
    """An object whose keys are regular expressions (PEFT matches them as ``(.*\\.)?(key)$``) and whose values pass
    ``values``."""

    def check(value):
        if not isinstance(value, dict):
            return f"must be an object, got {_shown(value)}"
        for key, item in value.items():
            error = pattern_error(key)
            if error is not None:
                return f"key {_shown(key)} is not a valid regular expression ({error})"
            problem = values(item)
            if problem:
                return f"entry {_shown(key)} {problem}"
        return None

    return check


def list_of(item: Check) -> Check:
    def check(value):
        if not isinstance(value, list):
            return f"must be a list, got {_shown(value)}"
        return next((f"item {i} {p}" for i, v in enumerate(value) if (p := item(v))), None)

    return check


def check_config(config: dict, schema: dict[str, Field], *, path: Path) -> dict:
    """``config`` checked against ``schema``: every field present is type-checked, every problem collected.

    Returns:
        The fields of ``schema``, each the config's value or its default (absent or null).

    Raises:
        InvalidConfigError: naming the first problem (and how many others), ``fields['problems']`` all of them.
    """
    problems, values = [], {}
    for key, field in schema.items():
        value = config.get(key)
        if value is None:
            if field.default is REQUIRED:
                problems.append(f"missing required field {key!r}")
            values[key] = None if field.default is REQUIRED else field.default
            continue
        problem = field.check(value)
        if problem:
            problems.append(f"field {key!r} {problem}")
        values[key] = value
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise InvalidConfigError(problems[0] + more, path=path, problems=problems)
    return values


@dataclass(frozen=True)
class _Fold:
    """One module's fold, as :class:`ValueChecks` checks it."""

    module: str
    parts: dict[str, torch.Tensor]
    names: tuple[str, str]
    delta: LowRankDelta
    largest_scale: float
    why: str


class ValueChecks:
    """The checks on the values of one adapter file: every entry finite, and every B times its scaling finite in
    float32 (a huge ``lora_alpha`` turns finite inputs into Inf). They also set each folded delta's ``bound``.

    They read all of the file's data, so they run on a thread of their own from the moment the file is read
    (:func:`finite_magnitude`, one reduction): the reader's per-module work, and a conversion's writes
    (``read_adapter(..., defer_checks=True)``), go on meanwhile. :meth:`wait` ends them and raises the first
    problem, every time it is called.

    Example:
        >>> checks = ValueChecks(tensors, weights_path=w, config_path=c)
        >>> delta = fold_scaling("m", parts, 0.5, names=("lora_A", "lora_B"), checks=checks, why="scaling 0.5")
        >>> checks.wait()  # NonFiniteError if the file holds NaN or Inf, or the fold overflows
    """

    def __init__(self, tensors: dict[str, torch.Tensor], *, weights_path: Path, config_path: Path):
        self.weights_path, self.config_path = weights_path, config_path
        self._folds: list[_Fold] = []
        self._error: BaseException | None = None
        self._done = False
        pool = ThreadPoolExecutor(1, thread_name_prefix="adaconvert-checks")  # aminmax releases the GIL
        self._magnitude: Future = pool.submit(finite_magnitude, tensors)
        pool.shutdown(wait=False)  # its thread ends with the reduction

    def add(self, fold: _Fold) -> None:
        self._folds.append(fold)

    def wait(self) -> None:
        """Wait for the file-wide reduction, then check each fold from it.

        Raises:
            NonFiniteError: an input holds NaN or Inf (the tensor named, ``weights_path``), or a product overflows
                float32 (``config_path``).
        """
        if self._error is not None:
            raise self._error
        if self._done:
            return
        try:
            magnitude = self._magnitude.result()
            for fold in self._folds:
                self._check(fold, magnitude)
        except BaseException as exc:
            self._error = exc
            raise
        self._done = True

    def _check(self, fold: _Fold, magnitude: float | None) -> None:
        if magnitude is None:  # NaN or Inf somewhere (or not one storage): each module on its own, to name it
            magnitudes = check_finite(fold.module, fold.parts, path=self.weights_path)
        else:
            magnitudes = dict.fromkeys(fold.parts, magnitude)
        delta, product = fold.delta, magnitudes[fold.names[1]] * fold.largest_scale
        delta.bound = max(magnitudes[fold.names[0]], product)
        # max|B| · max|scale| bounds every product and float rounding is monotonic: far below float32's largest
        # value nothing overflows and the product need not be computed here; near it (or past it), every element is
        # checked
        if (
            delta.rank
            and delta.out_features
            and not product <= _FOLD_SAFE  # also NaN: 0 × Inf
            and not torch.isfinite(torch.stack(torch.aminmax(delta.B))).all()
        ):
            raise NonFiniteError(
                f"lora_B × {fold.why} overflows float32 (NaN or Inf)", path=self.config_path, module=fold.module
            )


def fold_scaling(
    module: str,
    parts: dict[str, torch.Tensor],
    scale: torch.Tensor | float,
    *,
    names: tuple[str, str],
    keep: torch.Tensor | None = None,
    checks: ValueChecks,
    why: str,
) -> LowRankDelta:
    """The module's delta ``(A[keep], B[:, keep] · scale[keep])`` in float32: its factors with its scaling folded into
    B (computed when read: ``LowRankDelta.folding``), its values checked by ``checks``.

    Args:
        parts: every tensor of the module as saved, A (r, in) and B (out, r) named by ``names``; ``checks`` checks
            each is finite: NaN or Inf anywhere reaches PEFT's output, also through a component that ``keep``
            drops (0 · NaN is NaN).
        scale: a float or an (r,) float32 vector (AdaLoRA's lora_E × scaling).
        keep: (k,) indices of the components to keep (None: all r); they are selected before the product, so
            that only the kept columns are multiplied and copied.
        checks: the file's :class:`ValueChecks`, which also check that the product stays finite and set the
            delta's ``bound``.
        why: names the factor in the overflow message.
    """
    scale32 = torch.as_tensor(scale, dtype=torch.float32)  # as the product uses it: 1e300 is Inf there
    largest = float(scale32.abs().max()) if scale32.numel() else 0.0
    delta = LowRankDelta.folding(parts[names[0]], parts[names[1]], scale, keep)
    checks.add(_Fold(module, parts, names, delta, largest, why))
    return delta


_FOLD_SAFE = torch.finfo(torch.float32).max / 2
