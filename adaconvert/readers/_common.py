"""Helpers shared by the readers: grouping state-dict keys per module, and the checks every tensor gets."""

from __future__ import annotations

from pathlib import Path

import torch

from adaconvert.errors import CorruptCheckpointError, InvalidConfigError, MissingTensorError, NonFiniteError

PEFT_PREFIX = "base_model.model."


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


def check_finite(module: str, parts: dict[str, torch.Tensor], *, path: Path) -> None:
    """Raise NonFiniteError naming the first tensor of ``parts`` holding NaN or Inf.

    min and max propagate NaN and reach ±Inf, so one fast reduction per tensor decides it.
    """
    for suffix, tensor in parts.items():
        if (
            tensor.is_floating_point()
            and tensor.numel()
            and not torch.isfinite(torch.stack(torch.aminmax(tensor))).all()
        ):
            raise NonFiniteError(f"{suffix} holds NaN or Inf values", path=path, module=module)


def require(config: dict, key: str, types: type | tuple[type, ...], *, path: Path):
    """``config[key]`` checked for presence and type."""
    if key not in config:
        raise InvalidConfigError(f"missing required field {key!r}", path=path)
    value = config[key]
    if not isinstance(value, types) or isinstance(value, bool):  # bool is an int to isinstance
        raise InvalidConfigError(f"field {key!r} has invalid value {value!r}", path=path)
    return value


def source_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype the adapter was saved in (float32 if it holds no tensor)."""
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
