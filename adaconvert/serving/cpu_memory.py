"""The KV cache size every vLLM engine we start on a CPU gets, so that vLLM's own default does not stop it.

vLLM's CPU worker, unless told the KV cache size, reserves ``gpu_memory_utilization`` (0.92) of the NUMA node's
total memory and refuses to start when less is available (``vllm/v1/worker/cpu_worker.py``, ``CPUWorker.__init__``;
vLLM 0.32): on any machine where other processes or the page cache hold memory, ``vllm serve`` dies before loading
the model. Given an explicit size (``kv_cache_memory_bytes``, or the ``VLLM_CPU_KVCACHE_SPACE`` variable) it skips
that reservation and only checks the cache against the node's available memory once the weights are loaded
(``determine_available_memory``). So, on vLLM's CPU platform and unless the user sized it, every engine gets an
explicit size: room for ``max_num_seqs`` sequences of ``max_model_len`` tokens, capped by a share of what the node
has available after the weights, and never less than one full-length sequence (vLLM's minimum; whether that fits is
then vLLM's to say). GPUs are left to vLLM's own sizing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from adaconvert.errors import InvalidConfigError

logger = logging.getLogger(__name__)

GIB = 1 << 30
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
# vLLM's own process beside its weights and KV cache (torch, its kernels, the tokenizer, the HTTP server)
_PROCESS_OVERHEAD = GIB
# the share of the node's memory left after weights and overhead that the cache may take: the machine is shared
_SHARE = 0.8
_BLOCK_TOKENS = 128  # vLLM's CPU block size: a sequence's cache is allocated in blocks of this many tokens
_NODE_ROOT = Path("/sys/devices/system/node")
# engine options by which the caller sizes vLLM's memory itself (then we do not)
SIZING_OPTIONS = ("kv_cache_memory_bytes", "gpu_memory_utilization")


@dataclass(frozen=True)
class NodeMemory:
    """Memory of the NUMA node vLLM's CPU worker allocates on (bytes); ``node`` None where there is no NUMA info.

    ``available`` counts what vLLM counts: free pages, the file cache and reclaimable slabs, clamped by the
    container's (cgroup's) limit."""

    node: int | None
    total: int
    available: int


def node_memory() -> NodeMemory:
    """The memory of the NUMA node of this process's first allowed CPU, as vLLM's CPU worker will measure it
    (``/sys/devices/system/node/node<N>/meminfo``; ``/proc/meminfo`` where there is no NUMA information)."""
    node = _first_cpu_node()
    info = _meminfo(_NODE_ROOT / f"node{node}" / "meminfo") if node is not None else None
    if info is None:
        node, info = None, _meminfo(Path("/proc/meminfo"))
    if info is None:  # not Linux
        import psutil

        memory = psutil.virtual_memory()
        return NodeMemory(None, memory.total, memory.available)
    total = info["MemTotal"]
    available = sum(info.get(k, 0) for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
    limit, usage = _cgroup_memory()
    if limit is not None and limit < total:
        total, available = limit, max(0, min(available, limit - (usage or 0)))
    return NodeMemory(node, total, available)


def kv_cache_bytes(
    base,
    *,
    dtype: str | None,
    max_model_len: int | None,
    max_num_seqs: int,
    kv_cache_gib: float | None = None,
) -> int | None:
    """The ``kv_cache_memory_bytes`` to start a vLLM engine on ``base`` with, or None to leave it to vLLM.

    Args:
        base: the base model (directory or Hub id; only its config is read).
        dtype: the engine's ``dtype`` (None or ``auto``: vLLM's CPU backend runs float32 models in bfloat16).
        max_model_len: the engine's context length (None: the model's ``max_position_embeddings``).
        max_num_seqs: sequences the engine batches at most.
        kv_cache_gib: the size the user asked for (``--kv-cache-gib``), used as is on any platform.

    Returns:
        Bytes; None when vLLM should size it itself: on a GPU, or when the user set ``VLLM_CPU_KVCACHE_SPACE``.

    Raises:
        InvalidConfigError: ``kv_cache_gib`` is not positive, or is given while ``VLLM_CPU_KVCACHE_SPACE`` is set
            (vLLM would use the variable).
    """
    user_env = os.environ.get(KV_ENV, "").strip() != ""
    if kv_cache_gib is not None:
        check_kv_cache_gib(kv_cache_gib)
        if user_env:
            raise InvalidConfigError(f"--kv-cache-gib and {KV_ENV} both size the KV cache: unset {KV_ENV}")
        return int(kv_cache_gib * GIB)
    if user_env or not _vllm_on_cpu():
        return None
    from adaconvert.base.model import BaseModel

    base = BaseModel.resolve(base)
    config = base.config
    itemsize = 4 if dtype in ("float32", "float") else 2  # "auto" runs float32 models in bfloat16 on CPU
    per_token = kv_bytes_per_token(config, itemsize=itemsize)
    context = max_model_len or getattr(config.get_text_config(), "max_position_embeddings", None) or 2048
    one = per_token * -(-context // _BLOCK_TOKENS) * _BLOCK_TOKENS
    weights = itemsize * sum(m.in_features * m.out_features for m in base.modules.values())
    memory = node_memory()
    budget = int(_SHARE * (memory.available - weights - _PROCESS_OVERHEAD))
    size = max(one, min(one * max_num_seqs, budget))
    logger.info(
        "KV cache for vLLM on CPU: %s (%d sequences of %d tokens need %s; NUMA node %s has %s of %s available, "
        "weights %s)",
        _shown(size),
        max_num_seqs,
        context,
        _shown(max_num_seqs * one),
        "-" if memory.node is None else memory.node,
        *map(_shown, (memory.available, memory.total, weights)),
    )
    return size


def check_kv_cache_gib(value: float | None) -> None:
    """Raise InvalidConfigError unless ``value`` (``--kv-cache-gib``) is None or positive."""
    if value is not None and not value > 0:
        raise InvalidConfigError(f"--kv-cache-gib must be positive, got {value}")


def kv_bytes_per_token(config, *, itemsize: int) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer, ``itemsize`` bytes per element.

    ``2 · layers · kv_heads · head_dim · itemsize``; ``config`` is a transformers config (its text config is used)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * itemsize


def _shown(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB // 10 else f"{size / 2**20:.1f} MiB"


def _vllm_on_cpu() -> bool:
    """True when the installed vLLM runs on its CPU platform (importing only vLLM's platform detection)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


def _first_cpu_node() -> int | None:
    try:
        cpu = min(os.sched_getaffinity(0))
    except (AttributeError, ValueError):
        return None
    nodes = [p.name for p in Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*")]
    return int(nodes[0].removeprefix("node")) if nodes else None


def _meminfo(path: Path) -> dict[str, int] | None:
    """``{field: bytes}`` of a meminfo file (``Node 0 MemTotal: 97421888 kB`` or ``MemTotal: 97421888 kB``)."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    info = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields = value.split()
        if fields and fields[0].isdigit():
            info[name.split()[-1]] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return info if "MemTotal" in info else None


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, usage) of this container's memory cgroup (v2, else v1); (None, None) when unlimited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(limit_file)
        if limit is not None:
            return (limit, _read_int(usage_file)) if limit < 1 << 62 else (None, None)
    return None, None


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
