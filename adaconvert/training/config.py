"""Training options: one dataclass, filled from a recipe file (YAML) and keyword overrides, checked in one place.

A recipe is a flat YAML mapping of the same names as the CLI options (``max_length`` or ``max-length``); the
ready recipes live in the top-level ``recipes/`` folder. Explicit options override the recipe, which overrides
the defaults below.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from adaconvert.base.quantization import QUANTIZATIONS
from adaconvert.errors import InvalidConfigError, SourceNotFoundError, first_line

METHODS = ("lora", "adalora", "lora-drop")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
IMPORTANCES = ("output", "weight-l1")
POLICIES = ("share", "drop")
GRANULARITIES = ("layer", "module")
QUANT_COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
RESUME_LATEST = "latest"  # --resume without a directory: the run's own OUTPUT.checkpoints
DEFAULT_THRESHOLD = 0.9  # LoRA-Drop's cumulative importance kept when neither threshold nor keep_fraction is given


def option(
    default=None,
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    bare: str | None = None,
):
    """A :class:`TrainOptions` field: its default, its ``--help`` text and, for text options, the accepted values.

    ``flag`` names the command-line spelling when it is not ``--<name-with-dashes>`` (``method`` is the command's
    argument, ``overwrite`` / ``quiet`` are the shared flags of every command). ``bare`` is the value of a text
    option given on the command line without one (``--resume`` alone).
    """
    # a list option's default is given as a tuple: each TrainOptions gets its own list
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, tuple) else {"default": default}
    return field(metadata={"help": help, "choices": choices, "flag": flag, "bare": bare}, **kwargs)


@dataclass
class TrainOptions:
    """Everything ``adaconvert train`` can be told. Ranks are counts, fractions are in (0, 1].

    This dataclass is the one list of training options: the CLI flags (:func:`click_options` in the CLI), the
    recipe check (:func:`load_options`) and the help text are generated from its fields, their types and their
    metadata. ``method``, ``model``, ``data`` and ``output`` have no default: they must come from the command line
    or the recipe.
    """

    method: str = option(help="lora, adalora or lora-drop.", choices=METHODS, flag="METHOD")
    model: str = option(help="Base model: local directory or Hub id.")
    data: str = option(help="Training data: .jsonl/.json/.txt/.csv/.tsv/.parquet file, or a `datasets` Hub name.")
    output: str = option(help="Adapter directory to write.")
    text_column: str = option("text", "Column / JSONL key holding the text.")
    split: str = option("train", "`datasets` split.")
    data_config: str | None = option(None, "`datasets` configuration name.")
    max_length: int = option(512, "Tokens per example; longer ones are truncated.")
    batch_size: int = option(4, "Examples per device per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    lr: float = option(2e-4, "Learning rate.")
    steps: int | None = option(None, "Optimizer steps (default: --epochs 1).")
    epochs: float | None = option(None, "Passes over the data.")
    warmup_ratio: float = option(0.0, "Linear warm-up, as a fraction of the steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    lr_scheduler: str = option("linear", "Learning-rate schedule, a transformers `lr_scheduler_type` (cosine, ...).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 turns clipping off).")
    target_modules: list[str] = option(  # noqa: RUF009 (option() returns a dataclass field with a default factory)
        ("all-linear",), "Comma-separated module names to adapt (all-linear: every linear but the head)."
    )
    r: int = option(8, "LoRA rank, for lora and lora-drop.")
    lora_alpha: float | None = option(None, "LoRA alpha (default 2 × rank, or 2 × init_r for adalora).")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    init_r: int = option(12, "AdaLoRA: initial rank per module.")
    target_r: int = option(8, "AdaLoRA: average final rank per module.")
    tinit: int | None = option(None, "AdaLoRA: warm-up steps before pruning (default 10% of the steps).")
    tfinal: int | None = option(None, "AdaLoRA: final steps with fixed ranks (default 20% of the steps).")
    delta_t: int | None = option(None, "AdaLoRA: steps between budget updates (default 1% of the steps).")
    beta1: float = option(0.85, "AdaLoRA: sensitivity smoothing.")
    beta2: float = option(0.85, "AdaLoRA: uncertainty smoothing.")
    orth_reg_weight: float = option(0.5, "AdaLoRA: orthogonality loss weight, per optimizer step.")
    pilot_fraction: float = option(0.1, "LoRA-Drop: share of data and steps for the pilot run.")
    importance: str = option("output", "LoRA-Drop scoring: Σ‖ΔW x‖² (output) or ‖A‖₁+‖B‖₁.", choices=IMPORTANCES)
    threshold: float | None = option(
        None,
        f"LoRA-Drop: keep units up to this cumulative importance (default {DEFAULT_THRESHOLD}, or --keep-fraction).",
    )
    keep_fraction: float | None = option(None, "LoRA-Drop: keep this fraction of the units instead.")
    policy: str = option(
        "share", "LoRA-Drop: the other units share one LoRA (share) or get none (drop).", choices=POLICIES
    )
    granularity: str = option(
        "layer", "LoRA-Drop selection unit: transformer block or single module.", choices=GRANULARITIES
    )
    importance_samples: int = option(256, "LoRA-Drop: pilot examples scored.")
    keep_layers: list[str] | None = option(  # noqa: RUF009 (as target_modules)
        None,
        "LoRA-Drop: comma-separated block indices that get their own LoRA (as `inspect --lora-drop-plan` prints); "
        "skips the pilot run.",
    )
    quantize: str | None = option(
        None,
        "Load the base quantised by bitsandbytes (QLoRA): nf4 or fp4 4-bit blocks, or int8 (LLM.int8()); adapters "
        "stay float32.",
        choices=QUANTIZATIONS,
    )
    double_quant: bool = option(True, "4-bit: quantise the block scales too (QLoRA's double quantisation).")
    quant_compute_dtype: str = option(
        "auto",
        "4-bit: dtype the dequantised weights are computed in (auto: bfloat16 with --precision bf16, float16 with "
        "fp16, else float32).",
        choices=QUANT_COMPUTE_DTYPES,
    )
    precision: str = option(
        "auto",
        "auto: bf16 on GPUs that compute it natively (Ampere+), fp16 on older GPUs, fp32 on CPU.",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass: less memory, more compute."
    )
    fsdp: bool = option(
        False,
        "Shard the base model, adapters, gradients and optimizer state over the processes of a torchrun / accelerate "
        "launch (FSDP2, one unit per decoder layer); default: DDP, a full copy on each.",
    )
    fsdp_offload_params: bool = option(
        False,
        "FSDP: keep the parameter shards, their gradients and the optimizer state in CPU memory, moved to the GPU "
        "for each unit's compute (slower; for bases whose shards do not fit the GPUs).",
    )
    save_steps: int | None = option(
        None,
        "Save a checkpoint every N optimizer steps in OUTPUT.checkpoints (the last two are kept), to --resume an "
        "interrupted run.",
    )
    resume: str | None = option(
        None,
        "Continue an interrupted run from its latest checkpoint, in DIR (a checkpoints directory) or, with no value, "
        "in OUTPUT.checkpoints; the other options must be the interrupted run's.",
        bare=RESUME_LATEST,
    )
    time_steps: bool = option(False, "Wait for the GPU after every step so that step times are exact (benchmarks).")
    seed: int = option(0, "Random seed.")
    logging_steps: int = option(10, "Log the loss every N steps.")
    eval_data: str | None = option(
        None, "Held-out data (any format --data takes, same --text-column): its loss is measured during training."
    )
    eval_fraction: float | None = option(None, "Hold out this fraction of --data (seeded) for the held-out loss.")
    eval_steps: int | None = option(
        None, "Held-out loss every N optimizer steps, and at the end (default: 10 evaluations per run)."
    )
    overwrite: bool = option(False, "Replace the output directory if it exists.", flag="--overwrite")
    quiet: bool = option(False, "No progress bars.", flag="--quiet")

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
REQUIRED = ("method", "model", "data", "output")


def flag(name: str) -> str:
    """The command-line spelling of option ``name`` (``max_length`` → ``--max-length``; ``method`` → ``METHOD``)."""
    return FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def option_kind(name: str) -> type:
    """The value type of option ``name``: int, float, str, bool or list (of str), ``None`` aside."""
    return next(k for k in _annotation_types(_HINTS[name]) if k is not type(None))


def option_help(name: str) -> str:
    """The ``--help`` text of option ``name``, its default appended when it has a plain one."""
    f = FIELDS[name]
    text = f.metadata["help"]
    if f.default_factory is not dataclasses.MISSING:
        return f"{text.rstrip('.')} (default {','.join(f.default_factory())})."
    if f.default is not None and f.default is not dataclasses.MISSING and option_kind(name) is not bool:
        return f"{text.rstrip('.')} (default {f.default})."
    return text


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
    missing = [name for name in REQUIRED if values.get(name) in (None, "")]
    if missing:
        raise InvalidConfigError(
            "missing training option(s): "
            + ", ".join(f"--{m}" for m in missing)
            + " (give them or set them in --config)"
        )
    options = TrainOptions(**{k: _coerce(k, v, config) for k, v in values.items()})
    check_options(options)
    return options


def read_recipe(path: str | Path, *, known=None) -> dict:
    """The options of a YAML recipe, names normalised (``max-length`` → ``max_length``); ``known``: the accepted
    names (default: the :class:`TrainOptions` fields; ``compare`` adds its own).

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
    known = set(FIELDS if known is None else known)
    unknown = sorted(set(values) - known)
    if unknown:
        known_names = ", ".join(sorted(known))
        raise InvalidConfigError(f"unknown option(s) {', '.join(unknown)}; known: {known_names}", path=path)
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
    elif float in kinds and not isinstance(value, bool) and (number := _number(value)) is not None:
        return number
    elif str in kinds and isinstance(value, (str, Path)):
        return str(value)
    elif list in kinds:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        # a YAML list of block indices reads as ints
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int)) for v in value):
            return [str(v) for v in value]
    wanted = "/".join(k.__name__ for k in kinds if k is not type(None))
    raise InvalidConfigError(f"option {name!r} must be {wanted}, got {value!r}", path=path)


def _number(value) -> float | None:
    """``value`` as a float: a number, or a string that spells a finite one (PyYAML reads ``2e-4``, without a dot,
    as a string); None for anything else."""
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


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

    for f in dataclasses.fields(o):
        allowed = f.metadata["choices"]
        value = getattr(o, f.name)
        need(
            allowed is None or value is None or value in allowed,
            f"{flag(f.name)} must be one of {', '.join(allowed or ())}, got {value!r}",
        )
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
    need(o.logging_steps >= 1, f"--logging-steps must be at least 1, got {o.logging_steps}")
    need(o.save_steps is None or o.save_steps >= 1, f"--save-steps must be at least 1, got {o.save_steps}")
    need(not o.fsdp_offload_params or o.fsdp, "--fsdp-offload-params offloads FSDP's shards: it needs --fsdp")
    need(
        not o.fsdp or (o.save_steps is None and o.resume is None),
        "--save-steps / --resume are not supported with --fsdp yet (checkpoints are written and read whole, by "
        "one process); use DDP, or train without checkpoints",
    )
    need(o.eval_data is None or o.eval_fraction is None, "give --eval-data or --eval-fraction, not both")
    need(
        o.eval_fraction is None or 0 < o.eval_fraction < 1, f"--eval-fraction must be in (0, 1), got {o.eval_fraction}"
    )
    need(o.eval_steps is None or o.eval_steps >= 1, f"--eval-steps must be at least 1, got {o.eval_steps}")
    need(
        o.eval_steps is None or o.eval_data is not None or o.eval_fraction is not None,
        "--eval-steps needs held-out data: --eval-data FILE or --eval-fraction F",
    )
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
        need(o.threshold is None or o.keep_fraction is None, "give --threshold or --keep-fraction, not both")
        need(o.threshold is None or 0 < o.threshold <= 1, f"--threshold must be in (0, 1], got {o.threshold}")
        need(
            o.keep_fraction is None or 0 < o.keep_fraction <= 1,
            f"--keep-fraction must be in (0, 1], got {o.keep_fraction}",
        )
        need(o.importance_samples >= 1, f"--importance-samples must be at least 1, got {o.importance_samples}")
        if o.keep_layers is not None:
            need(
                o.threshold is None and o.keep_fraction is None,
                "--keep-layers names the kept layers itself: drop --threshold / --keep-fraction",
            )
            need(o.granularity == "layer", "--keep-layers names transformer blocks: it needs --granularity layer")
            bad = [k for k in o.keep_layers if not k.isdigit()]
            need(not bad, f"--keep-layers takes block indices (0,3,...), got {', '.join(bad)}")
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
