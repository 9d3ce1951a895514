"""``train``: LoRA, AdaLoRA or LoRA-Drop on top of ``transformers.Trainer`` (DDP, or FSDP2 with ``fsdp``, through
``torchrun`` or ``accelerate launch``), written as a standard PEFT adapter directory.

The story: check options, launch and output (on every process, before any model is loaded), load tokenizer, data
and base model, run the method's phases, gather the adapter (whole tensors, once, on every process) and write it
atomically with its metadata (``rank_history.json`` for AdaLoRA, ``lora_drop.json`` for LoRA-Drop,
``training_summary.json`` for all). Only the main process writes.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from adaconvert.base.quantization import bnb_config, check_bitsandbytes, exact_cpu_kernels
from adaconvert.constants import LORA_DROP_NAME, RANK_HISTORY_NAME, TRAINING_SUMMARY_NAME
from adaconvert.errors import InvalidConfigError, SourceNotFoundError, first_line
from adaconvert.io.atomic import atomic_output_dir, check_output
from adaconvert.io.location import is_hub_id
from adaconvert.process import hf_progress, import_deepspeed_logging_to_stderr
from adaconvert.training import lora_drop
from adaconvert.training.adalora import AdaLoraCallback, adalora_config, freeze_ranknum, module_ranks
from adaconvert.training.checkpoints import PhaseCheckpoints, RunCheckpoints
from adaconvert.training.config import DEFAULT_THRESHOLD, TrainOptions, adalora_schedule, load_options, optimizer_steps
from adaconvert.training.data import CausalCollator, TokenizedDataset, load_texts, tokenize
from adaconvert.training.heldout import eval_record, split_heldout
from adaconvert.training.phase import PhaseStats, run_phase
from adaconvert.training.sharding import adapter_state_dict, broadcast_object, on_main_then_all, rank, world_size

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What ``train`` did. ``model`` is the trained ``PeftModel`` (left out of ``to_dict``)."""

    method: str
    output: str
    written: bool
    world_size: int
    total_params: int
    main: PhaseStats
    pilot: PhaseStats | None = None
    rank_history: dict | None = None
    ranks: dict[str, int] | None = None
    lora_drop: dict | None = None
    eval: dict | None = None  # held-out loss curve and jitter (heldout.eval_record), with --eval-data / -fraction
    options: dict = field(default_factory=dict)
    model: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "model"}
        for phase in ("main", "pilot"):
            if data[phase] is not None:
                stats = data[phase]
                data[phase] = {
                    **asdict(stats),
                    "median_step_s": stats.median_step_s,
                    "tokens_per_s": stats.tokens_per_s,
                }
        return data

    def text(self) -> str:
        """What was written and measured, the method's own figures, and the next command."""
        main = self.main
        lines = [
            f"wrote {self.output}: {self.method}, "
            f"{main.optimizer_steps} optimizer steps in {main.wall_s:.1f} s "
            f"(median {main.median_step_s * 1e3:.1f} ms/step, {main.tokens_per_s:,.0f} tokens/s), "
            f"{main.trainable_params:,} trainable parameters, loss {main.train_loss:.4f}"
        ]
        if self.ranks is not None:
            history = self.rank_history
            lines.append(
                f"AdaLoRA: total rank {sum(self.ranks.values())} (budget {history['target_budget']}, from "
                f"{history['init_r']} × {len(self.ranks)} modules), {len(history['history'])} budget steps; "
                f"history in rank_history.json"
            )
        if self.lora_drop is not None:
            drop = self.lora_drop
            pilot = "no pilot (--keep-layers), "
            if drop["pilot"]:
                pilot = f"{drop['pilot']['trainable_params']:,} in the pilot, "
            lines.append(
                f"LoRA-Drop: kept {drop['kept']}, {drop['policy']} {drop['shared'] or drop['dropped']}; trainable "
                f"parameters {pilot}{drop['main']['trainable_params']:,} in the main run; details in lora_drop.json"
            )
        if self.eval is not None and self.eval["curve"]:
            curve, jitter = self.eval["curve"], self.eval["jitter"]
            lines.append(
                f"held-out loss ({self.eval['examples']} examples, {self.eval['tokens']:,} tokens): "
                f"{curve[0]['loss']:.4f} at step {curve[0]['step']} → {curve[-1]['loss']:.4f} at step "
                f"{curve[-1]['step']} ({len(curve)} evaluations); jitter "
                + (f"{jitter:.4f} from step {self.eval['jitter_from_step']}" if jitter is not None else "n/a")
                + f"; curve in {TRAINING_SUMMARY_NAME}"
            )
        lines.append(f"next: adaconvert to-lora {self.output} {self.output}-lora")
        return "\n".join(lines)


def train(method: str | None = None, *, config: str | Path | None = None, callbacks=(), **options) -> TrainResult:
    """Train an adapter with ``method`` and write it as a PEFT directory.

    Args:
        method: ``lora``, ``adalora`` or ``lora-drop`` (or from the recipe).
        config: a YAML recipe; explicit ``options`` override it.
        callbacks: extra ``transformers.TrainerCallback`` objects, added to every phase.
        **options: any :class:`~adaconvert.training.config.TrainOptions` field (``model``, ``data``, ``output``,
            ``steps``, ``init_r``...).

    Returns:
        :class:`TrainResult`; ``written`` is false on the non-main processes of a distributed run.

    Raises:
        InvalidConfigError: bad or impossible settings. InvalidDataError: unusable data. SourceNotFoundError:
        missing model, data or recipe. OutputExistsError: ``output`` exists and ``overwrite`` is false.

    Example:
        >>> result = train("adalora", model="Qwen/Qwen2.5-0.5B", data="data.jsonl", output="runs/ada", steps=500)
        >>> result.rank_history["history"][-1]["total_rank"] == result.rank_history["target_budget"]
        True
    """
    opts = load_options(method, config=config, **options)
    if accelerate_flag("ACCELERATE_USE_FSDP"):  # `accelerate launch --use_fsdp`: the same as --fsdp
        opts = replace(opts, fsdp=True)
    if opts.fsdp and accelerate_flag("FSDP_ACTIVATION_CHECKPOINTING"):  # the model checkpoints, FSDP does not
        opts = replace(opts, gradient_checkpointing=True)
    if opts.fsdp and accelerate_flag("FSDP_OFFLOAD_PARAMS"):  # `--fsdp_offload_params true`
        opts = replace(opts, fsdp_offload_params=True)
    check_launch(opts)
    check_base(opts)
    checkpoints = RunCheckpoints.of(opts)

    def check_outputs() -> None:
        check_output(opts.output, overwrite=opts.overwrite, inputs=[opts.model, opts.data, opts.eval_data, config])
        if checkpoints is not None:
            checkpoints.check(opts, world_size())
            checkpoints.start(opts, world_size())

    on_main_then_all(check_outputs, cuda=torch.cuda.is_available())
    main_process = rank() == 0
    precision = resolve_precision(opts.precision)
    _set_seed(opts.seed)
    import_deepspeed_logging_to_stderr(quiet=opts.quiet)  # before the Trainer imports it (its log: stdout)
    with hf_progress(not opts.quiet):
        tokenizer = load_tokenizer(opts.model)
        texts = load_texts(opts.data, text_column=opts.text_column, split=opts.split, data_config=opts.data_config)
        dataset = tokenize(texts, tokenizer, max_length=opts.max_length, where=opts.data)
        dataset, eval_dataset = _heldout(dataset, tokenizer, opts)
        logger.info("%d training examples, %d tokens", len(dataset), dataset.num_tokens)
        # impossible settings are refused before the (large) model is loaded
        check_world_fits(opts, len(dataset), world_size())
        if opts.method == "adalora":
            adalora_schedule(opts, optimizer_steps(opts, len(dataset), world_size()))
        load = functools.partial(
            load_base_model,
            opts.model,
            precision,
            quantization=quantization_config(opts, precision),
            weights=not opts.fsdp or main_process,
        )
        run = {"lora": _run_lora, "adalora": _run_adalora, "lora-drop": _run_lora_drop}[opts.method]
        result = run(_Run(load, dataset, tokenizer, opts, precision, list(callbacks), checkpoints, eval_dataset))
    if eval_dataset is not None:
        result.eval = eval_record(
            result.main.eval_curve,
            start_step=_settle_step(result),
            eval_steps=opts.eval_steps or max(1, result.main.optimizer_steps // 10),
            examples=len(eval_dataset),
            tokens=eval_dataset.num_tokens,
        )
    result.options = opts.to_dict()
    result.written = main_process
    state = adapter_state_dict(result.model)  # a collective under FSDP: every process gathers
    if main_process:
        _write(result, opts, state)
    return result


def _heldout(dataset: TokenizedDataset, tokenizer, opts: TrainOptions):
    """(training examples, held-out examples or None): ``eval_data`` tokenised like the training data, or
    ``eval_fraction`` of the training examples set aside."""
    if opts.eval_fraction is not None:
        return split_heldout(dataset, opts.eval_fraction, seed=opts.seed)
    if opts.eval_data is None:
        return dataset, None
    texts = load_texts(opts.eval_data, text_column=opts.text_column, split=opts.split, data_config=opts.data_config)
    return dataset, tokenize(texts, tokenizer, max_length=opts.max_length, where=opts.eval_data)


def _settle_step(result: TrainResult) -> int:
    """Where the jitter window starts: AdaLoRA's final fine-tuning (ranks fixed, ``total_step − tfinal``);
    LoRA-Drop's main run starts after the drop and LoRA has no schedule, so theirs is the whole curve."""
    if result.rank_history is not None:
        return result.rank_history["total_step"] - result.rank_history["tfinal"]
    return 0


def accelerate_flag(name: str) -> bool:
    """Whether ``accelerate launch`` set ``name`` (``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``: from its
    flags or its config file)."""
    return os.environ.get(name, "false").lower() == "true"


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of an ``accelerate launch`` with DeepSpeed (None without DeepSpeed, or when its DeepSpeed
    config file cannot be read: accelerate then stops on it itself): from the DeepSpeed config file that the
    accelerate config names, else from its ``zero_stage`` (default 2, as in accelerate's plugin)."""
    if not accelerate_flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file == "none":
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    try:
        return int(json.loads(Path(config_file).read_text(encoding="utf-8"))["zero_optimization"]["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def accelerate_started_one_process() -> bool:
    """Whether ``accelerate launch`` was asked for several processes and started this one alone: its single-process
    launcher (the one it picks on CPU, or on one GPU, without ``--multi_gpu`` / ``--use_fsdp``) sets a main
    process address only when more than one process was asked for, and never the world size."""
    return "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ


def check_launch(opts: TrainOptions) -> None:
    """Refuse, before any work, what this launch cannot train.

    Raises:
        InvalidConfigError: ``fsdp`` without a distributed launch, with DeepSpeed or with ``quantize``; AdaLoRA
            under DeepSpeed, any method under DeepSpeed ZeRO-3; an ``accelerate launch`` that started one process
            where several were asked for.
    """
    if opts.method == "adalora" and accelerate_flag("ACCELERATE_USE_DEEPSPEED"):
        raise InvalidConfigError(
            "AdaLoRA under DeepSpeed is not supported: DeepSpeed steps and clears the gradients inside backward, "
            "so the rank budget would score zeros; launch with DDP (torchrun) or --fsdp"
        )
    if deepspeed_zero_stage() == 3:
        raise InvalidConfigError(
            "DeepSpeed ZeRO-3 is not supported: it partitions the adapter's weights, which training reads whole and "
            "saves (they would be written empty); use ZeRO stage 1 or 2, --fsdp (accelerate launch --use_fsdp) or "
            "DDP"
        )
    if accelerate_started_one_process():
        raise InvalidConfigError(
            "accelerate launch started a single process, not the several asked for: without an `accelerate config` "
            "and with fewer than 2 GPUs it starts several only with --multi_gpu (DDP; gloo on CPU) or --use_fsdp "
            "(one process meant? then MASTER_ADDR, which accelerate sets only for several, is your environment's: "
            "unset it)"
        )
    if not opts.fsdp:
        return
    if opts.quantize is not None:
        raise InvalidConfigError(
            f"--quantize {opts.quantize} and FSDP cannot be combined here: FSDP would shard the quantised weights; "
            "train on one GPU (QLoRA) or with DDP"
        )
    if world_size() < 2:
        raise InvalidConfigError(
            "--fsdp needs a distributed launch of at least 2 processes (torchrun --nproc_per_node N -m adaconvert.cli "
            "train ..., or accelerate launch); this is a single process"
        )
    if accelerate_flag("ACCELERATE_USE_DEEPSPEED"):
        raise InvalidConfigError("--fsdp and DeepSpeed exclude each other; drop one")


def check_base(opts: TrainOptions) -> None:
    """Refuse, before any model is loaded, a ``quantize`` that bitsandbytes cannot run on this machine's device and
    ``keep_layers`` naming blocks the base lacks (read from its config alone).

    Raises:
        InvalidConfigError: one line naming the problem.
        SourceNotFoundError: the base has no readable config (``keep_layers`` only).
    """
    if opts.quantize is not None:
        check_bitsandbytes(opts.quantize, "cuda" if torch.cuda.is_available() else "cpu")
    if opts.keep_layers is not None:
        from adaconvert.base.model import BaseModel

        _check_model_exists(opts.model)
        config = BaseModel.resolve(opts.model).config
        layers = getattr(config.get_text_config(), "num_hidden_layers", None)
        missing = [k for k in opts.keep_layers if layers is not None and int(k) >= layers]
        if missing:
            raise InvalidConfigError(
                f"--keep-layers names block(s) {', '.join(missing)} but the model has {layers} (0-{layers - 1})",
                path=opts.model,
            )


def quantization_config(opts: TrainOptions, precision: str):
    """The ``BitsAndBytesConfig`` of ``opts.quantize`` (None without it); 4-bit layers compute in
    ``quant_compute_dtype``, whose ``auto`` follows the training precision."""
    if opts.quantize is None:
        return None
    compute = opts.quant_compute_dtype
    if compute == "auto":
        compute = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    return bnb_config(opts.quantize, double_quant=opts.double_quant, compute_dtype=getattr(torch, compute))


def check_world_fits(opts: TrainOptions, num_examples: int, world: int) -> None:
    """Every process needs its own examples for a micro-batch: with fewer than ``world × batch_size`` examples the
    distributed sampler repeats examples to fill them.

    Raises:
        InvalidConfigError: the data cannot feed ``world`` processes.
    """
    if world > 1 and num_examples < world * opts.batch_size:
        raise InvalidConfigError(
            f"{num_examples} training examples cannot feed {world} processes × --batch-size {opts.batch_size}; "
            "use fewer processes, a smaller --batch-size or more data",
            path=opts.data,
        )


def load_tokenizer(model: str):
    """The base model's tokenizer, with a pad token (EOS when it has none).

    Raises:
        SourceNotFoundError: no such model directory, or a Hub id that cannot be loaded.
    """
    from transformers import AutoTokenizer

    _check_model_exists(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise SourceNotFoundError(f"cannot load the tokenizer ({first_line(exc)})", path=model) from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise InvalidConfigError("the tokenizer has neither a pad nor an EOS token", path=model)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _check_model_exists(model: str) -> None:
    if not is_hub_id(model) and not Path(model).exists():
        raise SourceNotFoundError("no such model directory", path=model)


def auto_precision(capability: tuple[int, int] | None) -> str:
    """What ``--precision auto`` means on a GPU of CUDA compute ``capability`` (``None``: no GPU).

    bf16 from Ampere (8.0) on, where the tensor cores compute it; fp16 before (Volta 7.0, Turing 7.5), where
    ``torch.cuda.is_bf16_supported()`` still says yes because bf16 is emulated, at a fraction of fp16's speed;
    fp32 on CPU.
    """
    if capability is None:
        return "fp32"
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def resolve_precision(precision: str) -> str:
    """``bf16``, ``fp16`` or ``fp32``; ``auto`` as :func:`auto_precision` decides for this machine's GPU.

    Raises:
        InvalidConfigError: fp16 asked for without a GPU.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return auto_precision(torch.cuda.get_device_capability() if cuda else None)
    if precision == "fp16" and not cuda:
        raise InvalidConfigError("--fp16 needs a CUDA GPU; use --bf16 or --precision fp32 on CPU")
    return precision


def load_base_model(model: str, precision: str, *, quantization=None, weights: bool = True):
    """The frozen base causal LM, in bf16 / fp16 for those precisions (adapters stay float32), else float32.

    ``weights=False`` builds it from its config with every parameter on the ``meta`` device (no memory, no read;
    the buffers, such as rotary frequencies, are real): what the other processes of an FSDP run hold until
    sharding fills their shards from the main process's weights, so that only one process of a node ever holds the
    whole base.

    With ``quantization`` (a ``BitsAndBytesConfig``) its linear layers are quantised by bitsandbytes while loading,
    on this process's device, and the model is prepared for k-bit training as PEFT documents it
    (``prepare_model_for_kbit_training``: the other weights in float32). Gradient checkpointing is left to the
    training phase, which enables it its own way for quantised and plain bases alike.
    """
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    _check_model_exists(model)
    if not weights:
        return _empty_base(model, dtype)
    kwargs = {}
    if quantization is not None:
        # this process's GPU (torchrun / accelerate set LOCAL_RANK): bitsandbytes quantises where the weights land
        device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
        kwargs = {"quantization_config": quantization, "device_map": {"": device}}
    try:
        base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise SourceNotFoundError(f"cannot load the model ({first_line(exc)})", path=model) from exc
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        exact_cpu_kernels(base)  # LoRA-Drop scores in eval mode: the same kernels as training
    return base


def _empty_base(model: str, dtype):
    """The causal LM of ``model`` built from its config, parameters on the ``meta`` device, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise SourceNotFoundError(f"cannot load the model config ({first_line(exc)})", path=model) from exc
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _targets(opts: TrainOptions):
    return "all-linear" if opts.target_modules == ["all-linear"] else list(opts.target_modules)


def _peft(base, config):
    from peft import get_peft_model

    try:
        return get_peft_model(base, config)
    except ValueError as exc:  # target modules not found, unsupported layer type
        raise InvalidConfigError(f"cannot apply the adapter ({first_line(exc)})") from exc


def _lora_config(opts: TrainOptions, target_modules):
    from peft import LoraConfig

    return LoraConfig(
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


def _load(load) -> tuple[object, int]:
    """The base model and its parameter count."""
    base = load()
    return base, sum(p.numel() for p in base.parameters())


@dataclass(frozen=True)
class _Run:
    """What every phase of one ``train`` call shares: the base loader, the tokenised data, the options, the
    precision, the caller's callbacks, the run's checkpoints and the held-out data."""

    load: Callable[[], object]
    dataset: TokenizedDataset
    tokenizer: object
    opts: TrainOptions
    precision: str
    callbacks: list
    checkpoints: RunCheckpoints | None
    eval_dataset: TokenizedDataset | None

    def main_phase(self, model, *extra_callbacks):
        """The method's main ``run_phase`` of ``model`` (all the data and steps, the held-out loss measured):
        (PhaseStats, world size)."""
        return run_phase(
            model,
            self.dataset,
            self.tokenizer,
            self.opts,
            precision=self.precision,
            callbacks=[*extra_callbacks, *self.callbacks],
            checkpoints=_phase(self.checkpoints),
            eval_dataset=self.eval_dataset,
        )


def _run_lora(run: _Run) -> TrainResult:
    base, total = _load(run.load)
    model = _peft(base, _lora_config(run.opts, _targets(run.opts)))
    stats, world = run.main_phase(model)
    return TrainResult("lora", run.opts.output, False, world, total, stats, model=model)


def _run_adalora(run: _Run) -> TrainResult:
    opts = run.opts
    base, total = _load(run.load)
    schedule = adalora_schedule(opts, optimizer_steps(opts, len(run.dataset), world_size()))
    model = _peft(base, adalora_config(opts, schedule, _targets(opts)))
    if thawed := freeze_ranknum(model):
        logger.debug("froze %d ranknum parameters that PEFT's dtype cast had made trainable", thawed)
    budget = AdaLoraCallback(model, opts)
    stats, world = run.main_phase(model, budget)
    history = budget.history_record()
    pattern = budget.config.rank_pattern
    ranks = module_ranks(pattern) if pattern else None
    return TrainResult(
        "adalora", opts.output, False, world, total, stats, rank_history=history, ranks=ranks, model=model
    )


def _run_lora_drop(run: _Run) -> TrainResult:
    """Pilot on a fraction of data and steps with LoRA everywhere, score, select, then the main run (on the
    unloaded pilot base, or, after an FSDP pilot, on a fresh ``load()``: a sharded base cannot be sharded again).
    With ``keep_layers`` the selection is given: no pilot, straight to the main run on the one base loaded; so it
    is when a resumed run finds the pilot's selection among its checkpoints. The held-out loss is measured in
    the main run only (after the drop)."""
    opts, checkpoints = run.opts, run.checkpoints
    base, total = _load(run.load)
    pilot = _peft(base, _lora_config(opts, _targets(opts)))
    modules = list(lora_drop.lora_modules(pilot))  # the target modules, resolved the way PEFT does
    units = list(lora_drop.unit_scores(dict.fromkeys(modules, 0.0), opts.granularity))
    record: dict = {"method": "lora-drop", "granularity": opts.granularity, "policy": opts.policy}
    pilot_stats, pilot_trained = None, False
    selection = checkpoints.selection() if checkpoints is not None else None
    if opts.keep_layers is not None:
        kept = [u for u in units if u in set(opts.keep_layers)]
        record.update(importance="given (--keep-layers)", pilot=None)
    elif selection is not None:  # a resumed run whose pilot was done
        kept, pilot_stats = selection["kept"], PhaseStats(**selection["pilot_stats"])
        record.update(selection["record"])
    else:
        pilot_phase = _phase(checkpoints, "pilot")
        kept, pilot_stats = _pilot_selection(pilot, run, record, pilot_phase)
        pilot_trained = True
        if checkpoints is not None and rank() == 0:
            checkpoints.save_selection({"kept": kept, "record": record, "pilot_stats": asdict(pilot_stats)})
    rest = [u for u in units if u not in set(kept)]
    drop_plan = lora_drop.plan(modules, kept, policy=opts.policy, granularity=opts.granularity)
    if not drop_plan.kept_modules:  # only a given selection can miss every target module
        raise InvalidConfigError(f"--keep-layers {','.join(opts.keep_layers)} holds none of the target modules")
    logger.info("LoRA-Drop keeps %s of %d units; %s the rest", kept, len(units), opts.policy)

    if opts.fsdp and pilot_trained:
        del pilot, base
        gc.collect()  # the pilot's Trainer and accelerator held the sharded model in reference cycles
        base = run.load()
    else:  # no pilot ran (--keep-layers), or it ran unsharded: its base serves the main run
        base = pilot.unload()  # the base model without any LoRA layer, for a fresh main run
        # PEFT hooks the embedding of a base that checkpoints so that its output requires a gradient, a hook the
        # main phase could not see to remove; that phase switches checkpointing on again without it
        base.gradient_checkpointing_disable()
    _set_seed(opts.seed)
    model = _peft(base, _lora_config(opts, drop_plan.target_modules))
    lora_drop.tie_shared(model, drop_plan.shared_groups)
    stats, world = run.main_phase(model)
    record.update(
        kept=kept,
        shared=rest if opts.policy == "share" else [],
        dropped=rest if opts.policy == "drop" else [],
        kept_modules=drop_plan.kept_modules,
        shared_groups=drop_plan.shared_groups,
        dropped_modules=drop_plan.dropped_modules,
        main={"trainable_params": stats.trainable_params},
    )
    return TrainResult(
        "lora-drop", opts.output, False, world, total, stats, pilot=pilot_stats, lora_drop=record, model=model
    )


def _pilot_selection(pilot, run: _Run, record: dict, checkpoints: PhaseCheckpoints | None):
    """Train ``pilot`` on a fraction of the data and steps, score its modules and select the units to keep.

    Returns:
        (kept units in model order, the pilot's PhaseStats); ``record`` gets the scores and the selection rule.
    """
    opts, dataset = run.opts, run.dataset
    n_pilot = max(1, math.ceil(opts.pilot_fraction * len(dataset)))
    order = list(range(len(dataset)))
    random.Random(opts.seed).shuffle(order)
    pilot_data = TokenizedDataset([dataset.examples[i] for i in order[:n_pilot]])
    pilot_steps = max(1, math.ceil(opts.pilot_fraction * opts.steps)) if opts.steps is not None else None
    pilot_stats, _ = run_phase(
        pilot,
        pilot_data,
        run.tokenizer,
        opts,
        precision=run.precision,
        callbacks=run.callbacks,
        steps=pilot_steps,
        desc="pilot",
        checkpoints=checkpoints,
    )
    module_scores = _same_on_every_process(_importance(pilot, pilot_data, run.tokenizer, opts))
    scores = lora_drop.unit_scores(module_scores, opts.granularity)
    importance = lora_drop.normalise(scores)
    threshold = opts.threshold if opts.keep_fraction is None else None
    if threshold is None and opts.keep_fraction is None:
        threshold = DEFAULT_THRESHOLD
    kept, _ = lora_drop.select_units(importance, threshold=threshold, keep_fraction=opts.keep_fraction)
    record.update(
        importance=opts.importance,
        threshold=threshold,
        keep_fraction=opts.keep_fraction,
        scores=scores,
        normalized_importance=importance,
        module_scores=module_scores,
        pilot={
            "examples": len(pilot_data),
            "optimizer_steps": pilot_stats.optimizer_steps,
            "trainable_params": pilot_stats.trainable_params,
        },
    )
    return kept, pilot_stats


def _phase(checkpoints: RunCheckpoints | None, name: str = "train") -> PhaseCheckpoints | None:
    return checkpoints.phase(name) if checkpoints is not None else None


def _importance(model, data: TokenizedDataset, tokenizer, opts: TrainOptions) -> dict[str, float]:
    if opts.importance == "weight-l1":
        return lora_drop.weight_l1_importance(model)
    sample = data.examples[: opts.importance_samples]
    collate = CausalCollator(tokenizer.pad_token_id)
    batches = (
        collate([{"input_ids": ids} for ids in sample[i : i + opts.batch_size]])
        for i in range(0, len(sample), opts.batch_size)
    )
    return lora_drop.output_importance(model, batches)


def _same_on_every_process(scores: dict[str, float]) -> dict[str, float]:
    """Rank 0's scores everywhere, so that every process selects the same layers (they agree anyway: same pilot
    weights after DDP, same sample)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return scores
    return broadcast_object(scores, src=0)


def _write(result: TrainResult, opts: TrainOptions, state: dict) -> None:
    """The PEFT adapter (``state``: its whole tensors), its method metadata and a summary, written atomically to
    ``opts.output``."""
    with (
        atomic_output_dir(opts.output, overwrite=opts.overwrite, inputs=[opts.model, opts.data]) as tmp,
        warnings.catch_warnings(),
    ):
        # AdaLoRA saves a fully pruned module as zero-size tensors (docs/design.md §2); PEFT warns that they look like
        # un-gathered FSDP / ZeRO-3 shards, which they are not
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        result.model.save_pretrained(str(tmp), state_dict=state)
        if result.rank_history is not None:
            _dump(tmp / RANK_HISTORY_NAME, result.rank_history)
        if result.lora_drop is not None:
            _dump(tmp / LORA_DROP_NAME, result.lora_drop)
        _dump(tmp / TRAINING_SUMMARY_NAME, result.to_dict())
    logger.info("wrote %s", opts.output)


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
