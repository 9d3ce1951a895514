"""What ``compare`` runs: the methods, the one budget rule that gives them the same final parameter budget, and the
options every run shares, from a YAML recipe (``recipes/compare-*.yaml``) and explicit options.

The budget rule, for the shared rank ``r`` (``--r``, default 8):

- LoRA: rank r on every target module;
- AdaLoRA: ``init_r`` = 2r, pruned to ``target_r`` = r on average (a total rank of r × modules at the end);
- LoRA-Drop: rank r, on its kept layers (the others share one LoRA per module kind, or none with ``drop``); its
  pilot is a rank-r LoRA everywhere, and is counted.

Everything else (data, steps, seed, precision, learning rate, batch) is the same for the three. The report shows
the parameters each method actually trained (pilot, main run) and the parameters of the adapter it served.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from adaconvert.errors import InvalidConfigError
from adaconvert.training.config import FIELDS, METHODS, load_options, read_recipe

ENGINES = ("auto", "vllm", "hf")
COMPARE_KEYS = ("methods", "reference_data", "split_on", "engine", "max_new_tokens")  # beside train's options
# options the budget rule sets from r: given explicitly, the three methods would no longer share one budget
RULE_SET = ("init_r", "target_r")
# options compare sets for each run itself
PER_RUN = ("method", "output", "overwrite", "quiet")


@dataclass
class ComparePlan:
    """Everything one comparison needs, checked. ``train`` holds the shared training options (by
    :class:`~adaconvert.training.config.TrainOptions` name); :meth:`run_options` adds the budget rule."""

    output: str
    methods: list[str]
    train: dict
    reference_data: str | None = None
    split_on: str | None = None
    engine: str = "auto"
    max_new_tokens: int = 16

    @property
    def r(self) -> int:
        return self.train.get("r") or FIELDS["r"].default

    def run_options(self, method: str) -> dict:
        """The ``train`` options of ``method``: the shared ones and the budget rule's ranks."""
        rule = {"lora": {}, "adalora": {"init_r": 2 * self.r, "target_r": self.r}, "lora-drop": {}}[method]
        return {**self.train, **rule}

    def budget_rule(self) -> str:
        r = self.r
        return f"LoRA rank {r}; AdaLoRA init_r {2 * r} → target_r {r}; LoRA-Drop rank {r} on its kept layers"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_methods(value: str | list[str] | None) -> list[str]:
    """``"lora,adalora"`` or a list → the methods in the order given, each once.

    Raises:
        InvalidConfigError: an unknown method, or none.
    """
    if value is None:
        return list(METHODS)
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise InvalidConfigError(f"--methods: unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not names:
        raise InvalidConfigError(f"--methods names no method; choose from {', '.join(METHODS)}")
    return names


def load_plan(
    *,
    config: str | Path | None = None,
    output: str | Path | None = None,
    methods=None,
    reference_data: str | None = None,
    split_on: str | None = None,
    engine: str | None = None,
    max_new_tokens: int | None = None,
    **train,
) -> ComparePlan:
    """The checked plan from a recipe and explicit options (``None``: unset; explicit ones win).

    A compare recipe is a flat YAML mapping: ``methods``, ``reference_data``, ``split_on``, ``engine``,
    ``max_new_tokens``, ``output`` and any ``train`` option but ``method``, ``init_r`` and ``target_r``.

    Raises:
        SourceNotFoundError: the recipe does not exist.
        InvalidConfigError: unknown or impossible options, an unknown method, options the budget rule sets.
    """
    values = _read_recipe(config) if config is not None else {}
    explicit = {
        "output": output,
        "methods": methods,
        "reference_data": reference_data,
        "split_on": split_on,
        "engine": engine,
        "max_new_tokens": max_new_tokens,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    values.update({k: (str(v) if isinstance(v, Path) else v) for k, v in train.items() if v is not None})
    ruled = [k for k in RULE_SET if k in values]
    if ruled:
        raise InvalidConfigError(
            f"compare sets {', '.join('--' + k.replace('_', '-') for k in ruled)} from --r (AdaLoRA init_r 2r → "
            "target_r r); give --r only"
        )
    missing = [k for k in ("model", "data", "eval_data", "output") if not values.get(k)]
    if missing:
        raise InvalidConfigError(
            "missing option(s): "
            + ", ".join("--" + m.replace("_", "-") for m in missing)
            + " (or set them in --config)"
        )
    plan = ComparePlan(
        output=str(values.pop("output")),
        methods=parse_methods(values.pop("methods", None)),
        reference_data=_opt_str(values.pop("reference_data", None)),
        split_on=values.pop("split_on", None),
        engine=values.pop("engine", None) or "auto",
        max_new_tokens=int(values.pop("max_new_tokens", None) or 16),
        train={k: v for k, v in values.items() if k not in PER_RUN},
    )
    if plan.engine not in ENGINES:
        raise InvalidConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {plan.engine!r}")
    if plan.max_new_tokens < 1:
        raise InvalidConfigError(f"--max-new-tokens must be at least 1, got {plan.max_new_tokens}")
    if plan.train.get("eval_fraction") is not None:
        raise InvalidConfigError("compare evaluates on --eval-data: drop --eval-fraction")
    for method in plan.methods:  # every problem of every run, before anything is trained
        load_options(method, output=str(Path(plan.output) / method / "adapter"), **plan.run_options(method))
    return plan


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


def _read_recipe(path: str | Path) -> dict:
    """A compare recipe: ``train``'s recipe format, with compare's own options and without ``method``."""
    values = read_recipe(path, known={*COMPARE_KEYS, *FIELDS})
    if "method" in values:
        raise InvalidConfigError("not a compare option: method (compare runs every method itself)", path=path)
    return values
