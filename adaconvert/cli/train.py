"""`train` and `demo`."""

from __future__ import annotations

import click

from adaconvert.cli.options import common_options, emit
from adaconvert.training.config import FIELDS, METHODS, flag, option_help, option_kind

# second spellings: torchrun's parser abbreviates its own options, so it takes ``--r`` for one of ``--rdzv-*``,
# ``--role``, ``--run-path``... and stops there (tests/test_cli_flags.py runs every flag through it)
_ALIASES = {"r": ("--rank",)}


def train_flags(fn=None, *, exclude: tuple[str, ...] = ()):
    """The ``train`` flags, one per :class:`~adaconvert.training.config.TrainOptions` field (its type, choices and
    help), but those named in ``exclude``. Every flag defaults to unset, so that a ``--config`` recipe can set it;
    fields with their own spelling (the METHOD argument, the shared ``--overwrite`` / ``--quiet``) are declared
    where that spelling lives. ``compare`` takes the same flags."""
    if fn is None:
        return lambda f: train_flags(f, exclude=exclude)
    for name in reversed(list(FIELDS)):
        if FIELDS[name].metadata["flag"] is not None or name in exclude:
            continue
        kind, choices, text = option_kind(name), FIELDS[name].metadata["choices"], option_help(name)
        if kind is bool:
            spelling = flag(name)
            fn = click.option(f"{spelling}/--no-{spelling[2:]}", name, default=None, help=text)(fn)
        else:
            click_type = click.Choice(choices) if choices else {list: str}.get(kind, kind)
            bare = FIELDS[name].metadata["bare"]
            optional_value = {"is_flag": False, "flag_value": bare} if bare is not None else {}
            spellings = (flag(name), *_ALIASES.get(name, ()))
            fn = click.option(*spellings, name, type=click_type, default=None, help=text, **optional_value)(fn)
    fn = click.option("--bf16", "precision_flag", flag_value="bf16", help="Same as --precision bf16.")(fn)
    fn = click.option("--fp16", "precision_flag", flag_value="fp16", help="Same as --precision fp16.")(fn)
    return click.option("--config", type=click.Path(dir_okay=False), help="YAML recipe (see recipes/).")(fn)


@click.command("train")
@click.argument("method", type=click.Choice(METHODS))
@train_flags
@common_options(overwrite=True)
def train_cmd(method, *, as_json, config, overwrite, precision_flag, **options):
    """Train a METHOD adapter (lora, adalora, lora-drop) on top of the HF Trainer; DDP or --fsdp via torchrun.

    Example: adaconvert train adalora --model Qwen/Qwen2.5-0.5B --data data.jsonl --output runs/ada --steps 500
    """
    from adaconvert.training import train

    options["precision"] = precision_flag or options["precision"]
    quiet = click.get_current_context().params.get("quiet", False) or as_json
    result = train(method, config=config, overwrite=overwrite or None, quiet=quiet or None, **options)
    if not result.written:  # a non-main process of a torchrun / accelerate run: the main one reports
        return
    emit(result.to_dict(), result.text(), as_json=as_json)


@click.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Where to leave the artefacts.")
@click.option("--steps", type=click.IntRange(min=10), help="Optimizer steps per training run (default 300).")
@click.option("--vllm/--no-vllm", default=None, help="Serve both adapters under vLLM (default: if installed).")
@click.option("--verbose", is_flag=True, help="Show third-party logs (else they go to DIR/third_party.log).")
@common_options(overwrite=True, library_log_here=True)
def demo_cmd(*, as_json, directory, steps, vllm, verbose, overwrite):
    """Tiny model, AdaLoRA and LoRA-Drop trained on an embedded dataset, converted, validated and served."""
    from adaconvert.demo.demo import run_demo

    quiet = click.get_current_context().params.get("quiet", False) or as_json
    echo = None if quiet else click.echo
    report = run_demo(directory, steps=steps, vllm=vllm, overwrite=overwrite, echo=echo, verbose=verbose)
    emit(report.to_dict(), f"demo finished; artefacts in {report.directory}", as_json=as_json)
