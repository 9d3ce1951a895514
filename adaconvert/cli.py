"""The ``adaconvert`` command: a thin click layer over the Python API.

Errors become one line and a non-zero exit in exactly one place (``main``); ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from adaconvert import errors

logger = logging.getLogger("adaconvert")

# exit codes by error family, so scripts can tell "bad input" from "not found" without parsing text
EXIT_CODES: dict[type[errors.AdaconvertError], int] = {
    errors.SourceNotFoundError: 3,
    errors.OutputExistsError: 4,
    errors.RankLimitError: 5,
    errors.ValidationError: 6,
    errors.AdaconvertError: 2,
}


def common_options(*, overwrite: bool = False):
    """The flags every command shares: --json, --debug, --quiet (and --overwrite for commands that write)."""

    def decorate(fn):
        @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
        @click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
        @click.option("--quiet", "-q", is_flag=True, help="Only errors on stderr; no progress bars.")
        @functools.wraps(fn)
        def wrapper(*args, as_json: bool, debug: bool, quiet: bool, **kwargs):
            level = logging.DEBUG if debug else logging.ERROR if quiet or as_json else logging.INFO
            logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
            ctx = click.get_current_context()
            ctx.meta["debug"] = debug
            return fn(*args, as_json=as_json, **kwargs)

        if overwrite:
            wrapper = click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")(wrapper)
        return wrapper

    return decorate


def emit(result: dict, text: str, *, as_json: bool) -> None:
    """Results go to stdout: JSON with --json, else the human text."""
    click.echo(json.dumps(result, indent=2, default=str) if as_json else text)


@click.group()
@click.version_option(package_name="adaconvert")
def cli():
    """Convert, inspect, merge and serve dynamic-rank adapters (AdaLoRA, LoRA-Drop) as plain LoRA."""


@cli.command("to-lora")
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--max-rank", type=int, help="Cap every module's rank (best approximation by SVD).")
@click.option("--energy", type=float, help="Keep singular values up to this fraction of each module's energy.")
@click.option("--tol", type=float, help="Max relative Frobenius error per module; keep the smallest rank within it.")
@click.option("--vllm-max-lora-rank", type=int, help="vLLM bucket every module must fit (compresses if asked to).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Output dtype (default: source).")
@common_options(overwrite=True)
def to_lora_cmd(src, dst, *, as_json, **options):
    """Convert SRC (AdaLoRA, LoRA or LoRA-Drop; directory or Hub id) into a rank-varying LoRA at DST."""
    from adaconvert.convert import to_lora

    report = to_lora(src, dst, **options)
    text = (
        f"wrote {dst}: {sum(1 for m in report.modules if m.rank_after)} modules "
        f"({len(report.removed_modules)} empty removed), max rank {report.max_rank}, "
        f"{report.params_after:,} parameters ({report.params_before:,} before), "
        f"max relative error {report.max_rel_error:.2e}\n"
        f"serve with vLLM: --enable-lora --max-lora-rank {report.vllm_max_lora_rank}"
    )
    emit(report.to_dict(), text, as_json=as_json)


@cli.command("inspect")
@click.argument("adapter")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a rank heatmap (layers × modules) PNG.")
@common_options()
def inspect_cmd(adapter, *, as_json, plot):
    """Show ADAPTER's rank allocation per layer and module, its size and the vLLM bucket it needs."""
    from adaconvert.card import rank_table
    from adaconvert.inspection import inspect

    report = inspect(adapter, plot=plot)
    kinds, rows = rank_table(report.ranks)
    short = [k.split(".")[-1] for k in kinds]
    widths = [max(len(s), 4) for s in short]
    lines = ["layer " + " ".join(s.rjust(w) for s, w in zip(short, widths, strict=True))]
    for label, row in rows:
        cells = ["-" if r is None else str(r) for r in row]
        lines.append(label.rjust(5) + " " + " ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    lines += [
        "",
        f"kind: {report.source_kind}   dtype: {report.dtype}",
        f"modules: {report.modules_with_weights} with weights of {report.modules}; total rank {report.total_rank}, "
        f"max {report.max_rank}",
        f"parameters: {report.params:,} ({report.bytes / 2**20:.2f} MiB)",
        f"fixed-rank LoRA with the same budget: rank {report.equal_budget_rank:.2f}; "
        f"fixed rank {report.max_rank} everywhere: {report.fixed_max_rank_params:,} parameters",
        f"vLLM --max-lora-rank: {report.vllm_max_lora_rank}",
    ]
    if plot:
        lines.append(f"heatmap: {plot}")
    emit(report.to_dict(), "\n".join(lines), as_json=as_json)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; turn our errors into one line on stderr and an exit code."""
    try:
        cli.main(args=argv, prog_name="adaconvert", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except errors.AdaconvertError as exc:
        if _debug(argv):
            raise
        click.echo(f"error: {exc}", err=True)
        return next(code for cls, code in EXIT_CODES.items() if isinstance(exc, cls))
    except OSError as exc:  # disk full, permission denied...: the environment, not a bug of ours
        if _debug(argv):
            raise
        click.echo(f"error: {exc}", err=True)
        return 1
    return 0


def _debug(argv: list[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
