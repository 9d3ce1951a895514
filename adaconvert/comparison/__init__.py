"""``compare``: LoRA, AdaLoRA and LoRA-Drop trained at one final parameter budget on the same data, steps, seed and
precision, then converted, validated and evaluated side by side.

``compare`` (runner.py) checks the options and the budget rule (plan.py), runs each method, measures quality
through ``adaconvert.evaluation`` and writes a :class:`CompareReport` (report.py); ``--demo`` inputs come from
demo.py.
"""

from adaconvert.comparison.report import CompareReport
from adaconvert.comparison.runner import compare

__all__ = ["CompareReport", "compare"]
