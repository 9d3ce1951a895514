"""Training options: one dataclass, filled from a recipe file (YAML) and keyword overrides, checked in one place.

A recipe is a flat YAML mapping of the same names as the CLI options (``max_length`` or ``max-length``); the
ready recipes live in the top-level ``training/`` folder. Explicit options override the recipe, which overrides
the defaults below.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from adaconvert.errors import InvalidConfigError, SourceNotFoundError, first_line

METHODS = ("lora", "adalora", "lora-drop")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
IMPORTANCES = ("output", "weight-l1")
POLICIES = ("share", "drop")
GRANULARITIES = ("layer", "module")
DEFAULT_THRESHOLD = 0.9  # LoRA-Drop's cumulative importance kept when neither threshold nor keep_fraction is given


@dataclass
class TrainOptions:
    """Everything ``adaconvert train`` can be told. Ranks are counts, fractions are in (0, 1].

    Attributes:
        method: ``lora``, ``adalora`` or ``lora-drop``.
        model: base model, a local directory or a Hub id.
        data: a ``.jsonl`` / ``.json`` / ``.txt`` / ``.csv`` / ``.parquet`` file, or a ``datasets`` Hub name.
        output: the adapter directory to write.
        text_column: column (JSONL key) holding the training text.
        split, data_config: ``datasets`` split and configuration name for Hub datasets.
        max_length: tokens per example (longer examples are truncated).
        batch_size: examples per device and micro-batch; ``grad_accum`` micro-batches make one optimizer step.
        steps / epochs: length of training in optimizer steps, or in passes over the data (default 1 epoch).
        target_modules: module names (suffixes) to adapt, or ``["all-linear"]`` (default: every linear layer but
            the output head).
        r, lora_alpha, lora_dropout: LoRA rank, alpha (default 2 × rank, so scaling 2) and dropout.
        init_r, target_r, tinit, tfinal, delta_t, beta1, beta2, orth_reg_weight: AdaLoRA's settings, as in the
            paper and PEFT; ``tinit`` / ``tfinal`` / ``delta_t`` default to 10 % / 20 % / 1 % of the steps.
        pilot_fraction: LoRA-Drop's pilot share of the data and steps.
        importance: ``output`` (paper: Σ‖ΔW x‖² over the pilot sample) or ``weight-l1`` (‖A‖₁ + ‖B‖₁).
        threshold / keep_fraction: keep the most important units until their cumulative normalised importance
            reaches ``threshold`` (default 0.9), or keep this fraction of them.
        policy: ``share`` (the rest share one LoRA per module kind, the paper) or ``drop`` (the rest get none).
        granularity: selection unit, ``layer`` (transformer block, default) or ``module``.
        importance_samples: at most this many pilot examples are scored.
        precision: ``auto`` (bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU), ``bf16``, ``fp16``,
            ``fp32``.
    """

    method: str
    model: str
    data: str
    output: str
    text_column: str = "text"
    split: str = "train"
    data_config: str | None = None
    max_length: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    steps: int | None = None
    epochs: float | None = None
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    r: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    init_r: int = 12
    target_r: int = 8
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    pilot_fraction: float = 0.1
    importance: str = "output"
    threshold: float | None = None
    keep_fraction: float | None = None
    policy: str = "share"
    granularity: str = "layer"
    importance_samples: int = 256
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 10
    overwrite: bool = False
    quiet: bool = False

    @property
    def alpha(self) -> float:
        """lora_alpha, defaulting to 2 × the (initial) rank."""
        if self.lora_alpha is not None:
            return self.lora_alpha
        return 2.0 * (self.init_r if self.method == "adalora" else self.r)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}
_HINTS = typing.get_type_hints(TrainOptions)


def load_options(method: str | None = None, *, config: str | Path | None = None, **overrides) -> TrainOptions:
    """Build and check :class:`TrainOptions` from a recipe file and explicit options (``None`` means unset).

    Args:
        method: ``lora``, ``adalora`` or ``lora-drop``; may come from the recipe instead.
        config: a YAML recipe (flat mapping of option names).
        **overrides: option values; ``None`` leaves the recipe's value or the default.

    Returns:
        The checked options.

    Raises:
        SourceNotFoundError: the recipe does not exist.
        InvalidConfigError: unknown option, wrong type, or an impossible combination (every problem in one line).
    """
    values: dict = {}
    if config is not None:
        values.update(read_recipe(config))
    if method is not None:
        if values.get("method") not in (None, method):
            raise InvalidConfigError(f"recipe is for method {values['method']!r}, not {method!r}", path=config)
        values["method"] = method
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise InvalidConfigError(f"unknown training option(s): {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [name for name in ("method", "model", "data", "output") if values.get(name) in (None, "")]
    if missing:
        raise InvalidConfigError(
            "missing training option(s): "
            + ", ".join(f"--{m}" for m in missing)
            + " (give them or set them in --config)"
        )
    options = TrainOptions(**{k: _coerce(k, v, config) for k, v in values.items()})
    check_options(options)
    return options


def read_recipe(path: str | Path) -> dict:
    """The options of a YAML recipe, names normalised (``max-length`` → ``max_length``).

    Raises:
        SourceNotFoundError: no such file.
        InvalidConfigError: not YAML, not a mapping, or an unknown option name.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError("no such recipe file", path=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InvalidConfigError(f"not valid YAML ({first_line(exc, None)})", path=path) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidConfigError("a recipe must be a mapping of option names to values", path=path)
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise InvalidConfigError(
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}", path=path
        )
    return values


def _coerce(name: str, value, path):
    """``value`` checked against the field's annotation (int, float, str, bool, list[str], or None)."""
    kinds = _annotation_types(_HINTS[name])
    if value is None and type(None) in kinds:
        return None
    if bool in kinds:
        if isinstance(value, bool):
            return value
    elif int in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif str in kinds and isinstance(value, (str, Path)):
        return str(value)
    elif list in kinds:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return list(value)
    wanted = "/".join(k.__name__ for k in kinds if k is not type(None))
    raise InvalidConfigError(f"option {name!r} must be {wanted}, got {value!r}", path=path)


def _annotation_types(hint) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_origin(a) or a for a in typing.get_args(hint))
    return (typing.get_origin(hint) or hint,)


def check_options(o: TrainOptions) -> None:
    """Reject impossible settings, every problem at once.

    Checks that need the real number of optimizer steps (AdaLoRA's ``tinit + tfinal < total_step``) are done by
    :func:`adalora_schedule` once that number is known.

    Raises:
        InvalidConfigError: one line listing every problem.
    """
    problems = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    need(o.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {o.method!r}")
    need(o.max_length >= 2, f"--max-length must be at least 2, got {o.max_length}")
    need(o.batch_size >= 1, f"--batch-size must be at least 1, got {o.batch_size}")
    need(o.grad_accum >= 1, f"--grad-accum must be at least 1, got {o.grad_accum}")
    need(o.lr > 0, f"--lr must be positive, got {o.lr}")
    need(o.steps is None or o.epochs is None, "give --steps or --epochs, not both")
    need(o.steps is None or o.steps >= 1, f"--steps must be at least 1, got {o.steps}")
    need(o.epochs is None or o.epochs > 0, f"--epochs must be positive, got {o.epochs}")
    need(0 <= o.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {o.warmup_ratio}")
    need(o.r >= 1, f"--r must be at least 1, got {o.r}")
    need(0 <= o.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {o.lora_dropout}")
    need(o.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {o.precision!r}")
    need(o.logging_steps >= 1, f"--logging-steps must be at least 1, got {o.logging_steps}")
    if o.method == "adalora":
        need(o.target_r >= 1, f"--target-r must be at least 1, got {o.target_r}")
        need(
            o.init_r > o.target_r,
            f"--init-r ({o.init_r}) must be larger than --target-r ({o.target_r}): AdaLoRA prunes from init_r "
            "down to target_r (use method lora for a fixed rank)",
        )
        for name in ("tinit", "tfinal"):
            value = getattr(o, name)
            need(value is None or value >= 0, f"--{name} must be at least 0, got {value}")
        need(o.delta_t is None or o.delta_t >= 1, f"--delta-t must be at least 1, got {o.delta_t}")
        need(0 < o.beta1 < 1 and 0 < o.beta2 < 1, f"--beta1 and --beta2 must be in (0, 1), got {o.beta1}, {o.beta2}")
        need(o.orth_reg_weight >= 0, f"--orth-reg-weight must be at least 0, got {o.orth_reg_weight}")
    if o.method == "lora-drop":
        need(0 < o.pilot_fraction <= 1, f"--pilot-fraction must be in (0, 1], got {o.pilot_fraction}")
        need(
            o.importance in IMPORTANCES, f"--importance must be one of {', '.join(IMPORTANCES)}, got {o.importance!r}"
        )
        need(o.policy in POLICIES, f"--policy must be one of {', '.join(POLICIES)}, got {o.policy!r}")
        need(
            o.granularity in GRANULARITIES,
            f"--granularity must be one of {', '.join(GRANULARITIES)}, got {o.granularity!r}",
        )
        need(o.threshold is None or o.keep_fraction is None, "give --threshold or --keep-fraction, not both")
        need(o.threshold is None or 0 < o.threshold <= 1, f"--threshold must be in (0, 1], got {o.threshold}")
        need(
            o.keep_fraction is None or 0 < o.keep_fraction <= 1,
            f"--keep-fraction must be in (0, 1], got {o.keep_fraction}",
        )
        need(o.importance_samples >= 1, f"--importance-samples must be at least 1, got {o.importance_samples}")
    if problems:
        raise InvalidConfigError("; ".join(problems))


@dataclass(frozen=True)
class AdaLoraSchedule:
    """AdaLoRA's budget schedule in optimizer steps: warm-up ``tinit``, final fine-tuning ``tfinal``, a mask
    update every ``delta_t`` steps in between, over ``total_step`` optimizer steps."""

    total_step: int
    tinit: int
    tfinal: int
    delta_t: int


def adalora_schedule(options: TrainOptions, total_step: int) -> AdaLoraSchedule:
    """The schedule for ``total_step`` real optimizer steps, defaults filled in (10 % / 20 % / 1 % of the steps).

    Raises:
        InvalidConfigError: no budgeting phase is left (``tinit + tfinal ≥ total_step``) or ``tfinal`` is 0 (the
            final allocation happens at step ``total_step - tfinal``, which must be a real step).
    """
    tinit = options.tinit if options.tinit is not None else int(0.1 * total_step)
    tfinal = options.tfinal if options.tfinal is not None else max(1, int(0.2 * total_step))
    delta_t = options.delta_t if options.delta_t is not None else max(1, total_step // 100)
    if tfinal < 1:
        raise InvalidConfigError(
            "--tfinal must be at least 1: AdaLoRA fixes the final ranks at step total_step - tfinal, which must be "
            "a real optimizer step"
        )
    if tinit + tfinal >= total_step:
        raise InvalidConfigError(
            f"AdaLoRA needs tinit + tfinal < total steps, got tinit={tinit} + tfinal={tfinal} >= {total_step} "
            "optimizer steps; lower --tinit/--tfinal or train longer"
        )
    return AdaLoraSchedule(total_step=total_step, tinit=tinit, tfinal=tfinal, delta_t=delta_t)


def optimizer_steps(options: TrainOptions, num_examples: int, world_size: int = 1) -> int:
    """The number of optimizer steps training will take, exactly as ``transformers.Trainer`` counts them.

    Each process sees ceil(n / world) examples (the distributed sampler pads), in ceil(· / batch) micro-batches;
    an epoch is ceil(micro-batches / grad_accum) optimizer steps.
    """
    if options.steps is not None:
        return options.steps
    per_process = math.ceil(num_examples / world_size)
    micro_batches = math.ceil(per_process / options.batch_size)
    per_epoch = max(micro_batches // options.grad_accum + int(micro_batches % options.grad_accum > 0), 1)
    return math.ceil((options.epochs if options.epochs is not None else 1.0) * per_epoch)
