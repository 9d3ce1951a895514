"""`inspect`: rank allocation, runtimes, LoRA-Drop plan."""

from __future__ import annotations

import click

from adaconvert.cli.options import common_options, emit


@click.command("inspect")
@click.argument("adapter")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a rank heatmap (layers × modules) PNG.")
@click.option(
    "--runtimes", "show_runtimes", is_flag=True, help="Say in which runtimes it is exact, wrong-scale or refused."
)
@click.option(
    "--lora-drop-plan",
    "drop_plan",
    is_flag=True,
    help="AdaLoRA: rank each layer by its share of the kept rank budget and print the `train lora-drop` command "
    "that keeps the important ones (--plot: a bar chart of the shares instead).",
)
@click.option("--threshold", type=float, help="--lora-drop-plan: keep layers up to this cumulative share (0.9).")
@click.option("--keep-fraction", type=float, help="--lora-drop-plan: keep this fraction of the layers instead.")
@common_options(overwrite=True, one_torch_thread=True)
def inspect_cmd(adapter, *, as_json, plot, show_runtimes, drop_plan, threshold, keep_fraction, overwrite):
    """Show ADAPTER's rank allocation per layer and module, its size and the vLLM bucket it needs.

    --runtimes adds the portability check: per runtime (PEFT, vLLM, llama.cpp/Ollama, SGLang, LoRAX/TGI, mlx-lm),
    exact, wrong-scale (which modules, by which factor) or refused (why), from the config and tensor shapes alone.
    --lora-drop-plan turns an AdaLoRA allocation into the LoRA-Drop layers to keep.
    """
    if drop_plan:
        _print_lora_drop_plan(
            adapter, plot=plot, overwrite=overwrite, threshold=threshold, keep_fraction=keep_fraction, as_json=as_json
        )
        return
    if threshold is not None or keep_fraction is not None:
        raise click.UsageError("--threshold and --keep-fraction go with --lora-drop-plan")
    from adaconvert.inspection import inspect

    report = inspect(adapter, plot=plot, overwrite=overwrite)
    emit(report.to_dict(), report.text(plot=plot, show_runtimes=show_runtimes), as_json=as_json)


def _print_lora_drop_plan(adapter, *, plot, as_json, **selection) -> None:
    from adaconvert.inspection import lora_drop_plan

    plan = lora_drop_plan(adapter, plot=plot, **selection)
    emit(plan.to_dict(), plan.text(plot=plot), as_json=as_json)
