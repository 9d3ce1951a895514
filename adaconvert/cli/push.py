"""`push`: upload an export to the Hugging Face Hub."""

from __future__ import annotations

import logging

import click

from adaconvert.cli.options import common_options, emit


@click.command("push")
@click.argument("adapter", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", "--branch", "revision", help="Branch to commit to (created if missing; default main).")
@click.option("--commit-message", help="Commit message (default: 'Upload adapter converted by adaconvert').")
@click.option("--token", help="Hub token (default: HF_TOKEN, else the `hf auth login` token). Never printed.")
@click.option("--dry-run", is_flag=True, help="List exactly what would be uploaded, and the card; send nothing.")
@click.option("--force", is_flag=True, help="Push even if the vLLM check fails or the conversion report is missing.")
@common_options()
def push_cmd(adapter, repo_id, *, as_json, **options):
    """Upload ADAPTER (a to-lora, to-mlx or merge output directory, or a to-gguf file) to the Hub as REPO_ID."""
    from adaconvert.hub import push

    result = push(adapter, repo_id, progress=logging.getLogger().isEnabledFor(logging.INFO), **options)
    emit(result.to_dict(), result.text(), as_json=as_json)
