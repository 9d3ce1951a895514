"""The ``adaconvert`` command: the group, its verbs (one module each beside this one) and the error table.

Errors become one line and a non-zero exit in exactly one place (``main``); ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import sys

import click

from adaconvert import errors
from adaconvert.cli import compare, convert, evaluate, inspect, merge, push, serve, train, validate

# exit codes by error family, so scripts can tell "bad input" from "not found" without parsing text
EXIT_CODES: dict[type[errors.AdaconvertError], int] = {
    errors.SourceNotFoundError: 3,
    errors.OutputExistsError: 4,
    errors.RankLimitError: 5,
    errors.ValidationError: 6,
    errors.HubError: 7,
    errors.BatchConversionError: 8,
    errors.ServeError: 9,
    errors.BaseMismatchError: 10,
    errors.ComparisonError: 11,
    errors.OutputWriteError: 1,  # the environment (disk full, read-only), as for any OSError below
    errors.AdaconvertError: 2,
}


@click.group()
@click.version_option(package_name="adaconvert")
def cli():
    """Convert, inspect, merge and serve dynamic-rank adapters (AdaLoRA, LoRA-Drop) as plain LoRA."""


# one module per verb group; click lists the verbs alphabetically whatever the order here
for command in (
    convert.to_lora_cmd,
    convert.to_gguf_cmd,
    convert.to_mlx_cmd,
    inspect.inspect_cmd,
    push.push_cmd,
    validate.validate_cmd,
    evaluate.eval_cmd,
    train.train_cmd,
    train.demo_cmd,
    serve.serve_cmd,
    merge.merge_cmd,
    compare.compare_cmd,
):
    cli.add_command(command)


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
