"""``push``: upload a converted adapter (or a merged model) to the Hugging Face Hub in one commit, with its card.

Plan, gate, upload: list the files, regenerate the model card with the repo id, refuse what vLLM would not load
(or what adaconvert did not write) unless forced, then ``create_repo`` + one ``create_commit``. Network errors are
retried by huggingface_hub (its ``http_backoff`` on preupload/LFS calls) or by ``hf_xet`` (Xet uploads, the
default when it is installed) and end in one :class:`HubError` line.
The token never appears in results, messages or logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaconvert.compat.layout import is_mlx_config
from adaconvert.constants import (
    ADAPTER_CONFIG_NAME,
    CARD_NAME,
    CONVERSION_REPORT_NAME,
    MERGE_REPORT_NAME,
    MODEL_CONFIG_NAME,
    RANK_HEATMAP_NAME,
    VALIDATION_REPORT_NAME,
)
from adaconvert.conversion.card import conversion_card, merged_card, snippet_id
from adaconvert.conversion.report import ConversionReport, gguf_side_files
from adaconvert.errors import AdaconvertError, HubError, InvalidConfigError, SourceNotFoundError, first_line

logger = logging.getLogger(__name__)

# Reports that prove adaconvert wrote the directory: a conversion (to-lora) or a merge.


@dataclass
class PushResult:
    """What was (or, with ``dry_run``, would be) uploaded.

    Attributes:
        repo_id: the target repo (with its namespace once the Hub resolved it).
        revision: the branch committed to.
        kind: ``adapter``, ``merged`` or ``gguf``.
        files: (path in repo, size in bytes) for every file of the commit, README.md (the card) included.
        card: the README.md text uploaded.
        problems: what the pre-push checks found (only non-empty when ``force`` let it through).
        commit_url: the commit's URL; None for a dry run.
    """

    repo_id: str
    revision: str
    kind: str
    private: bool
    files: list[tuple[str, int]]
    card: str | None
    dry_run: bool
    problems: list[str] = field(default_factory=list)
    commit_url: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """The files pushed (or, for a dry run, to be pushed, and the card)."""
        where = f"{self.repo_id}@{self.revision}" + (" (private)" if self.private else "")
        listing = "\n".join(f"{size:>14,}  {name}" for name, size in self.files)
        if self.dry_run:
            card = f"\n\n--- README.md (model card) ---\n{self.card}" if self.card else ""
            return f"dry run: would push {len(self.files)} files to {where}:\n{listing}{card}"
        return f"pushed {len(self.files)} files to {where}:\n{listing}\ncommit: {self.commit_url}"


def push(
    adapter: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
) -> PushResult:
    """Upload a directory written by adaconvert (converted adapter or merged model) to the Hub, in one commit.

    The README.md is regenerated from ``conversion_report.json`` with ``repo_id`` in its snippets (the local file is
    left as it is). An adapter must pass the static vLLM check (LoRA keys only, positive integer ranks within
    vLLM's buckets, no DoRA/bias; a ``to-mlx`` output: mlx-lm's rules instead) and carry its conversion report,
    unless ``force``.

    Args:
        adapter: local directory (``to-lora``, ``to-mlx`` or ``merge`` output) or a ``to-gguf`` file (``NAME.gguf``:
            uploaded with its ``NAME.report.json`` as ``conversion_report.json`` and ``NAME.README.md`` as the card).
        repo_id: ``namespace/name`` on the Hub; created if missing (existing repos are committed to).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from main if missing); default ``main``.
        commit_message: default "Upload <kind> converted by adaconvert".
        token: Hub token; default the usual ``HF_TOKEN`` / ``hf auth login`` token. Never printed or logged.
        dry_run: only plan: no token needed, nothing sent.
        force: push even when the checks fail (their problems are still returned).
        progress: show huggingface_hub's upload progress bars (stderr).

    Returns:
        :class:`PushResult`.

    Raises:
        SourceNotFoundError: ``adapter`` is not a directory.
        InvalidConfigError: not an adaconvert output / fails the vLLM check (without ``force``), or a bad repo id.
        HubError: no token, or the Hub refused or could not be reached (after huggingface_hub's retries).

    Example:
        >>> push("runs/adalora-lora", "me/adalora-lora", dry_run=True).files
        [('README.md', 2817), ('adapter_config.json', 1320), ...]
    """
    root = Path(adapter)
    gguf = root.suffix == ".gguf" and root.is_file()
    if not gguf and not root.is_dir():
        raise SourceNotFoundError("no such directory (or .gguf file)", path=root)
    _check_repo_id(repo_id)
    kind = "gguf" if gguf else _kind(root)
    problems = _gguf_problems(root) if gguf else _check(root, kind)
    if problems and not force:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise InvalidConfigError(
            f"refusing to push: {shown} (pass --force to push anyway)", path=root, problems=problems
        )
    for problem in problems:
        logger.warning("pushing despite: %s", problem)

    if gguf:
        card, local = _gguf_upload(root)
    else:
        card = _card(root, kind, repo_id)
        local = _local_files(root, skip={CARD_NAME} if card is not None else set())
    files = sorted([(name, path.stat().st_size) for name, path in local.items()])
    if card is not None:
        files = sorted([*files, (CARD_NAME, len(card.encode("utf-8")))])
    result = PushResult(
        repo_id=repo_id,
        revision=revision or "main",
        kind=kind,
        private=private,
        files=files,
        card=card,
        dry_run=dry_run,
        problems=problems,
    )
    if dry_run:
        return result
    message = commit_message or f"Upload {kind} converted by adaconvert"
    result.commit_url, result.repo_id = _upload(
        local, card, repo_id, private=private, revision=revision, token=token, progress=progress, message=message
    )
    logger.info("pushed %d files to %s@%s", len(files), result.repo_id, result.revision)
    return result


def _gguf_problems(path: Path) -> list[str]:
    report, _ = gguf_side_files(path)
    return [] if report.is_file() else [f"no {report.name}: convert it with adaconvert to-gguf first"]


def _gguf_upload(path: Path) -> tuple[str | None, dict[str, Path]]:
    """(card, {path in repo: local path}) of a ``to-gguf`` output: ``NAME.gguf`` under its own name, its
    ``NAME.report.json`` as the repo's conversion report and its ``NAME.README.md`` as the repo's card.

    Raises:
        InvalidConfigError: one of the files is a symlink that leads out of the GGUF's directory.
    """
    report, card = gguf_side_files(path)
    inside = path.parent.resolve()
    for file in (path, report, card):
        if file.exists():
            _require_inside(file, inside, shown=file.name, path=file)
    local = {path.name: path} | ({CONVERSION_REPORT_NAME: report} if report.is_file() else {})
    return (card.read_text(encoding="utf-8") if card.is_file() else None), local


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidConfigError(f"invalid Hub repo id {repo_id!r}: {first_line(exc, 300)}") from exc


def _kind(root: Path) -> str:
    if (root / ADAPTER_CONFIG_NAME).is_file():
        return "adapter"
    if (root / MODEL_CONFIG_NAME).is_file():
        return "merged"
    raise InvalidConfigError("neither an adapter (adapter_config.json) nor a model (config.json)", path=root)


def _check(root: Path, kind: str) -> list[str]:
    """Every reason not to push: missing report, and (adapters) whatever vLLM would reject."""
    if kind == "merged":
        if any((root / name).is_file() for name in (MERGE_REPORT_NAME, CONVERSION_REPORT_NAME)):
            return []
        return [f"no {MERGE_REPORT_NAME}: not written by adaconvert merge"]
    problems = (
        []
        if (root / CONVERSION_REPORT_NAME).is_file()
        else [f"no {CONVERSION_REPORT_NAME}: convert it with adaconvert to-lora first"]
    )
    config = json.loads((root / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    if is_mlx_config(config):  # a to-mlx output: mlx-lm's rules, not vLLM's
        from adaconvert.compat.runtimes import check_runtimes

        verdict = check_runtimes(root, runtimes=["mlx-lm"])["mlx-lm"]
        return problems + ([] if verdict.status == "exact" else [f"mlx-lm would not load it: {verdict.reason}"])
    return problems + _base_problems(root) + vllm_problems(root)


def _base_problems(root: Path) -> list[str]:
    """``base_model_name_or_path`` must be a Hub id or a plain local path: it goes into the card's snippets."""
    try:
        base = json.loads((root / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return []  # the vLLM check reports an unreadable config
    if base is None or snippet_id(base) is not None:
        return []
    return [
        f"base_model_name_or_path {str(base)[:80]!r} in adapter_config.json is neither a Hub id nor a plain path "
        "(it would break the model card's code); set it to the base model's id"
    ]


def vllm_problems(root: Path) -> list[str]:
    """What vLLM's LoRA loader would reject in the adapter at ``root``, found without starting an engine
    (:func:`adaconvert.compat.vllm.check_vllm_compat`); module names are checked against the base model too when
    ``base_model_name_or_path`` is a local directory."""
    from adaconvert.compat.vllm import check_vllm_compat

    base = _local_base(root)
    try:
        return [str(p) for p in check_vllm_compat(root, base_config=base)]
    except AdaconvertError as exc:  # the base model's config cannot be read: check the adapter alone
        logger.warning("checking without the base model %s: %s", base, exc)
        return [str(p) for p in check_vllm_compat(root)]


def _local_base(root: Path) -> Path | None:
    try:
        base = json.loads((root / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return Path(base) if isinstance(base, str) and base and (Path(base) / MODEL_CONFIG_NAME).is_file() else None


def _card(root: Path, kind: str, repo_id: str) -> str | None:
    """The card to upload, regenerated with ``repo_id``; None to keep the local README.md (no report to build on)."""
    if kind == "merged":
        return _merged_card(root, repo_id)
    report_path = root / CONVERSION_REPORT_NAME
    if not report_path.is_file():
        return None
    try:
        report = ConversionReport.read(report_path)
        config = json.loads((root / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
        validation = (
            json.loads((root / VALIDATION_REPORT_NAME).read_text("utf-8"))
            if (root / VALIDATION_REPORT_NAME).is_file()
            else None
        )
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidConfigError(f"cannot build the model card ({first_line(exc, 300)})", path=report_path) from exc
    return conversion_card(
        report,
        base_model=config.get("base_model_name_or_path") or report.base_model,
        repo_id=repo_id,
        task_type=config.get("task_type"),
        heatmap=RANK_HEATMAP_NAME if (root / RANK_HEATMAP_NAME).is_file() else None,
        validation=validation if isinstance(validation, dict) else None,
    )


def _merged_card(root: Path, repo_id: str) -> str | None:
    report_path = root / MERGE_REPORT_NAME
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidConfigError(f"cannot build the model card ({first_line(exc, 300)})", path=report_path) from exc
    adapters = [a for a in report.get("adapters") or [] if isinstance(a, dict)]
    # shown in inline code: a source that would break it is left unnamed
    used = (
        ", ".join(f"{snippet_id(a.get('source')) or 'an adapter'} (weight {a.get('weight', 1.0)})" for a in adapters)
        or None
    )
    figures = {k: report[k] for k in ("dtype", "shards", "tensors", "tensors_touched", "bytes_written") if k in report}
    return merged_card(
        base_model=report.get("base"),
        adapter=used,
        source_kind=adapters[0].get("kind", "lora") if adapters else "lora",
        repo_id=repo_id,
        figures=figures,
    )


def _local_files(root: Path, *, skip: set[str]) -> dict[str, Path]:
    """{path in repo: local path} for every regular file under ``root``; hidden files and dirs are left out.

    Raises:
        InvalidConfigError: a symlink (to a file or a directory) leads out of ``root``: it would upload
            whatever it points to, ``/etc/passwd`` or a private key alike.
    """
    inside = root.resolve()
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() in skip:
            continue
        _require_inside(path, inside, shown=rel.as_posix(), path=root)
        if path.is_file():
            out[rel.as_posix()] = path
    return out


def _require_inside(file: Path, inside: Path, *, shown: str, path: Path) -> None:
    """Refuse ``file`` when it resolves outside ``inside``: a link (to a file or a directory), or a file below a
    linked directory, would upload whatever it points to.

    Raises:
        InvalidConfigError: naming ``shown`` and where it leads.
    """
    target = file.resolve()
    if not target.is_relative_to(inside):
        raise InvalidConfigError(
            f"refusing to push: {shown} is a symlink to {target}, outside the directory; "
            "copy the file in if it belongs to the upload",
            path=path,
        )


def _upload(local, card, repo_id, *, private, revision, token, progress, message) -> tuple[str, str]:
    """create_repo + (create_branch) + one create_commit. Returns (commit URL, resolved repo id)."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = token or get_token()
    if not token:
        raise HubError(
            f"push to {repo_id}: no Hugging Face token; pass --token, set HF_TOKEN, or run `hf auth login`",
            repo_id=repo_id,
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    operations = [CommitOperationAdd(name, str(path)) for name, path in local.items()]
    if card is not None:
        operations.append(CommitOperationAdd(CARD_NAME, card.encode("utf-8")))
    step = "creating the repo"
    try:
        with _progress_bars(progress):
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            repo_id = url.repo_id or repo_id
            if revision and revision != "main":
                step = f"creating branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            step = "uploading the files"
            info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except _network_errors() as exc:
        raise HubError(f"push to {repo_id}: {_describe(exc, step, token)}", repo_id=repo_id) from None
    except RuntimeError as exc:
        # huggingface_hub wraps a failed LFS upload: RuntimeError("Error while uploading 'NAME' to the Hub.") from
        # the HTTP or transport error, once its retries are spent
        if not isinstance(exc.__cause__, _network_errors()):
            raise
        name = re.search(r"uploading '(.+)' to the Hub", str(exc))
        step = f"uploading {name.group(1)}" if name else step
        raise HubError(f"push to {repo_id}: {_describe(exc.__cause__, step, token)}", repo_id=repo_id) from None
    return str(info.commit_url), repo_id


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises for HTTP errors, transport failures and server-side refusals (ValueError)."""
    from huggingface_hub.errors import HfHubHTTPError

    types: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError]
    for module in ("httpx2", "httpx", "requests"):  # whichever transport this huggingface_hub version loaded
        lib = sys.modules.get(module)
        base = getattr(lib, "HTTPError", None) or getattr(lib, "RequestException", None)
        if base is not None:
            types.append(base)
    return tuple(t for t in types if isinstance(t, type) and not issubclass(t, AdaconvertError))


def _describe(exc: BaseException, step: str, token: str) -> str:
    """One line: which step failed, the HTTP status and server message or the transport error, and what to do."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        server = getattr(exc, "server_message", None) or ""
        what = f"the Hub answered HTTP {status}" + (f" ({first_line(server, 300)})" if server.strip() else "")
        if status in (401, 403):
            what += "; check the token (--token / HF_TOKEN) and its write access"
    else:
        what = f"{type(exc).__name__}: {first_line(exc, 300)}"
    text = f"{step} failed: {what}; nothing was changed locally and pushing again is safe"
    return text.replace(token, "***") if token else text


@contextmanager
def _progress_bars(enabled: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
