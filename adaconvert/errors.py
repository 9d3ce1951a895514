"""One error family for the whole toolchain.

Every error a user can cause derives from :class:`AdaconvertError` and also from the builtin it resembles, so
callers may catch either (``except FileNotFoundError`` keeps working). Each carries structured fields; the CLI
turns them into one line in exactly one place (``cli.main``).
"""

from __future__ import annotations

from pathlib import Path


class AdaconvertError(Exception):
    """Root of every error adaconvert raises on purpose.

    Args:
        message: one line, naming the problem and, where there is one, the fix.
        path: the file or directory concerned, if any; prefixed to the message.
        module: the adapter module concerned, if any.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, module: str | None = None, **fields):
        self.message = message
        self.path = str(path) if path is not None else None
        self.module = module
        self.fields = fields
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.path, f"module {self.module}" if self.module else None) if p]
        return f"{': '.join(parts)}: {self.message}" if parts else self.message

    def __reduce__(self):
        # keep the structured fields across process boundaries (batch conversion runs workers)
        return (_rebuild, (type(self), self.message, self.path, self.module, self.fields))


def _rebuild(cls, message, path, module, fields):
    return cls(message, path=path, module=module, **fields)


class SourceNotFoundError(AdaconvertError, FileNotFoundError):
    """The adapter, base model or one of their files does not exist."""


class InvalidConfigError(AdaconvertError, ValueError):
    """adapter_config.json (or a model config) is missing a field, malformed, or describes something unsupported."""


class UnknownAdapterTypeError(InvalidConfigError):
    """``peft_type`` names a method no reader handles."""


class CorruptCheckpointError(AdaconvertError, ValueError):
    """A weights file cannot be parsed: truncated, corrupt, or not the claimed format."""


class AdapterShapeError(AdaconvertError, ValueError):
    """Tensors of one module do not fit each other or the base model; ``expected``/``actual`` in ``fields``."""


class MissingTensorError(AdaconvertError, KeyError):
    """A module lacks one of the tensors its method needs (e.g. ``lora_E``)."""

    __str__ = AdaconvertError.__str__  # KeyError would quote the message


class NonFiniteError(AdaconvertError, ValueError):
    """NaN or Inf in an adapter tensor or in a merged weight."""


class RankLimitError(AdaconvertError, ValueError):
    """A module's rank exceeds what the target runtime can serve (vLLM ``max_lora_rank``)."""


class OutputExistsError(AdaconvertError, FileExistsError):
    """The destination exists and ``overwrite`` was not given."""


class ValidationError(AdaconvertError, ValueError):
    """A validation found differences beyond tolerance; ``fields['problems']`` lists every one."""


class BaseMismatchError(AdaconvertError, ValueError):
    """An adapter or merged model was made for another base model: a module it adapts is missing from the base or
    of another shape, or the merged model is another architecture."""


class InvalidDataError(AdaconvertError, ValueError):
    """Training data cannot be used: empty, malformed (line number in ``fields['line']``), or a column is missing."""


class HubError(AdaconvertError, ConnectionError):
    """A Hub operation failed: no token, the Hub refused (HTTP status in the message) or could not be reached."""


class BatchConversionError(AdaconvertError, RuntimeError):
    """Some adapters of a batch failed; ``fields['failures']`` maps each source to its one-line error."""


class ComparisonError(AdaconvertError, RuntimeError):
    """Some methods of a ``compare`` failed (the others' results are written); ``fields['failures']`` maps each
    method to its one-line error."""


class ServeError(AdaconvertError, OSError):
    """The vLLM server cannot start or stopped: port in use, vLLM missing, exited early, not ready in time."""


class UnsupportedPlatformError(AdaconvertError, OSError):
    """This operating system lacks what the operation needs (e.g. positioned I/O for merge on Windows)."""


def first_line(exc: BaseException | str, limit: int | None = 200) -> str:
    """The first line of an exception's message (or of a text), cut at ``limit`` characters, for one-line errors;
    the exception's type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class OutputOverlapError(AdaconvertError, ValueError):
    """The destination is, contains or lies inside one of the inputs: writing it would destroy them."""


class OutputWriteError(AdaconvertError, OSError):
    """The output cannot be written (disk full, read-only filesystem, file too large); ``path`` is the user's DST."""
