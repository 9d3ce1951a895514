"""Validators: prove that a conversion (or a merge) computes what the original adapter computes.

Three levels — weights (ΔW from the factors), logits (PEFT on prompts), vLLM (a real engine) — each adding rows
to one :class:`ValidationReport`. The package is named ``validation`` so that ``adaconvert.validate`` can be the
function, as ``adaconvert.inspect`` lives in ``inspection``.
"""

from adaconvert.validation.checks import Check, Problem, Tolerances, ValidationReport
from adaconvert.validation.runner import validate

__all__ = ["Check", "Problem", "Tolerances", "ValidationReport", "validate"]
