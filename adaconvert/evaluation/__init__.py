"""``eval``: which adapter is any good — held-out loss, generation quality and forgetting, side by side.

``evaluate`` (runner.py) resolves the subjects (subjects.py), reads the data (data.py), runs one engine
(engines.py: vLLM multi-LoRA or transformers + PEFT) and scores the outputs (metrics.py) into an ``EvalReport``
(report.py).
"""

from adaconvert.evaluation.report import EvalReport, EvalRow
from adaconvert.evaluation.runner import evaluate

__all__ = ["EvalReport", "EvalRow", "evaluate"]
