"""vLLM's one-line reason for not starting, from its log or from the exception it raised in this process.

When vLLM fails to start it prints tracebacks from several processes (the worker, the engine core, the API server)
and the last exception is a consequence ("Engine core initialization failed. See root cause above."). The reason a
user can act on is the first exception raised, e.g. "ValueError: Available memory on node 0 (7.21/8.84 GiB) on
startup is less than desired CPU memory utilization ...".
"""

from __future__ import annotations

import re

# "(EngineCore pid=12) ERROR 12-03 06:57:07 [core.py:1510] " before a logged line, each part optional
_LOG_PREFIX = re.compile(
    r"^(?:\(\S+ pid=\d+\)\s+)?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+"
    r"\[[^\]]*\]\s+)?"
)
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception)): (\S.*)$")
# messages that only say that something else failed first
_CONSEQUENCES = ("Engine core initialization failed", "EngineCore failed", "WorkerProc initialization failed")
# pydantic's first line ("1 validation error for ModelConfig") names no problem: the reason is on a later line
_PYDANTIC_HEADER = re.compile(r"^\d+ validation errors? for ")
_PYDANTIC_DETAIL = re.compile(r"^\s*(?:Value error, |Assertion failed, )?(\S.*?)(?: \[type=.*)?$")


def failure_reason(log_text: str) -> str | None:
    """The first exception vLLM's output shows that is not a consequence of another, as ``Type: message``;
    None when there is none."""
    lines = [_LOG_PREFIX.sub("", line) for line in log_text.splitlines()]
    for i, line in enumerate(lines):
        match = _EXCEPTION_LINE.match(line)
        if match is None or match.group(2).startswith(_CONSEQUENCES):
            continue
        name, message = match.groups()
        if _PYDANTIC_HEADER.match(message):
            message = _pydantic_detail(lines[i + 1 :]) or message
        return f"{name}: {message.strip()}"
    return None


def exception_reason(exc: BaseException) -> str:
    """The same one-line reason for an exception raised in this process: its root cause's first line."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    lines = text.splitlines()
    message = lines[0] if lines else ""
    if _PYDANTIC_HEADER.match(message):
        message = _pydantic_detail(lines[1:]) or message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _pydantic_detail(following: list[str]) -> str | None:
    """The first 'Value error, ...' line of a pydantic ValidationError (after the field name line)."""
    for line in following[:6]:
        if "Value error, " in line or "Assertion failed, " in line:
            return _PYDANTIC_DETAIL.match(line).group(1)
    return None
