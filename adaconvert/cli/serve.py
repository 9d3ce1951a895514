"""`serve`: many adapters at once under vLLM's OpenAI-compatible server."""

from __future__ import annotations

import click

from adaconvert.cli.options import common_options, emit, name_value


class _PassThroughCommand(click.Command):
    """A command whose arguments after ``--`` are kept apart, untouched, in ``ctx.meta['passthrough']``."""

    def parse_args(self, ctx, args):
        if "--" in args:
            cut = args.index("--")
            args, ctx.meta["passthrough"] = args[:cut], args[cut + 1 :]
        return super().parse_args(ctx, args)


@click.command("serve", cls=_PassThroughCommand)
@click.argument("base")
@click.argument("adapters", nargs=-1, metavar="[NAME=ADAPTER]... [-- VLLM_ARGS...]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--api-key",
    envvar="VLLM_API_KEY",
    help="Clients must send it as a bearer token; needed for a non-loopback --host. Prefer the VLLM_API_KEY "
    "environment variable: a command-line argument shows in `ps`. Never printed.",
)
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key (anyone may use it).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-lora-rank", type=int, help="vLLM bucket (default: the smallest that serves every adapter).")
@click.option("--max-loras", type=click.IntRange(min=1), help="Adapters in one batch (default: all).")
@click.option("--max-cpu-loras", type=click.IntRange(min=1), help="Adapters kept in CPU memory (default: all).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where conversions made for serving go.")
@click.option(
    "--adapter-store",
    type=click.Path(file_okay=False),
    help="Directory of adapters (NAME or ORG/NAME): a request naming one is converted, checked and loaded on demand.",
)
@click.option(
    "--allow-runtime-load",
    is_flag=True,
    help="Open vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter to clients (they load any path here).",
)
@click.option("--print-command", is_flag=True, help="Print the exact `vllm serve` command instead of running it.")
@click.option("--dry-run", is_flag=True, help="Read, check and convert everything, check the port; start nothing.")
@click.option("--ready-timeout", type=float, default=1800, show_default=True, help="Seconds to wait for readiness.")
@click.option(
    "--kv-cache-gib",
    type=float,
    help="vLLM's KV cache size in GiB (default on a CPU: sized from the model and the free memory; on a GPU: vLLM's).",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    help="Append vLLM's output to this file (default: a new file under the cache directory's logs/).",
)
@common_options()
def serve_cmd(base, adapters, *, as_json, print_command, dry_run, **options):
    """Serve NAME=ADAPTER pairs and/or every adapter of --adapter-store on BASE with vLLM's OpenAI-compatible
    server; Ctrl-C stops it.

    Adapters not in the safe export layout (AdaLoRA, LoRA with alpha != r...) are converted first, into the cache;
    those of the store when a request first names them.
    """
    from adaconvert.serving.server import serve

    extra = click.get_current_context().meta.get("passthrough", [])
    named = name_value(adapters, "NAME=ADAPTER")
    plan = serve(base, named, extra_args=extra, print_command=print_command, dry_run=dry_run, **options)
    if print_command:
        emit(plan.to_dict(), plan.shell_command(), as_json=as_json)
    elif dry_run:
        emit(plan.to_dict(), plan.table(), as_json=as_json)
