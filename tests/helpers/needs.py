"""The one rule for tests that need an optional runtime (vLLM, llama.cpp, mlx-lm, bitsandbytes, ...): where it is
not installed they skip on a developer's machine and fail in CI (``CI`` set), so they can never be skipped there."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing(what: str, *, purpose: str) -> None:
    """Something a test needs is not there: skip locally, fail in CI."""
    if in_ci():
        pytest.fail(f"{what}, but CI must run {purpose}", pytrace=False)
    pytest.skip(what, allow_module_level=True)  # also from a module's top level


def require(module: str, *, purpose: str = "these tests") -> ModuleType:
    """Import ``module`` for a test; skip locally, fail in CI when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(f"{module} is not installed ({exc})", purpose=purpose)


def expect_installed(module: str, *, purpose: str) -> bool:
    """Whether ``module`` is installed, without importing it; in CI it must be."""
    installed = importlib.util.find_spec(module) is not None
    if not installed and in_ci():
        pytest.fail(f"{module} is not installed, but CI must run {purpose}")
    return installed


def require_mlx_lm() -> ModuleType:
    """mlx-lm where it is installed; skipped locally without it, a failure in CI (never skipped there)."""
    return require("mlx_lm", purpose="the mlx-lm tests")
