"""ASGI middleware for vLLM's API server (``vllm serve --middleware <import path>``), installed by ``serve``.

vLLM adds each ``--middleware`` class with ``app.add_middleware(cls)`` (``vllm/entrypoints/serve/middleware/
register.py:131-135``), after its own authentication middleware, so ours run outermost: before the API key is
checked and before any route.

- :class:`CloseRuntimeLoading`: ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which resolvers need, also opens
  ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (``vllm/entrypoints/serve/lora/api_router.py:30-99``)
  and, through the SageMaker standards it registers with, ``POST /adapters`` and ``DELETE /adapters/{name}``: any
  client with the key could load any path on the machine. This answers 403 on all of them.
- :class:`AdapterStoreMiddleware`: tells the store resolver the running engine's limits (``app.state.
  vllm_config``, ``vllm/entrypoints/launchers/api_server/app_state.py``) and, when an adapter already loaded from
  the store has been edited, unloads it through vLLM's own ``unload_lora_adapter`` so that this request resolves
  (and converts) it again: vLLM never asks resolvers about a name it has loaded (``vllm/entrypoints/openai/models/
  serving.py:314``).
"""

from __future__ import annotations

import json
import re

from adaconvert.serving.resolver import ENGINE_LIMITS, EngineLimits, registered_resolver

# the routes VLLM_ALLOW_RUNTIME_LORA_UPDATING opens (trailing slash and any root path prefix included)
_RUNTIME_LOADING = re.compile(r"/(?:v1/load_lora_adapter|v1/unload_lora_adapter|adapters(?:/[^/]*)?)/*$")


class CloseRuntimeLoading:
    """403 for every route that loads or unloads an adapter by path at runtime; everything else passes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _RUNTIME_LOADING.search(scope["path"]):
            from starlette.responses import JSONResponse

            message = "loading adapters by path is disabled on this server (adaconvert serve --allow-runtime-load)"
            error = {"message": message, "type": "PermissionDenied", "param": None, "code": 403}
            await JSONResponse({"error": error}, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class AdapterStoreMiddleware:
    """Gives the store resolver the engine's limits for each request and has edited adapters resolved again."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Starlette puts the application in the scope before running the middleware stack
        state = scope["app"].state
        token = ENGINE_LIMITS.set(EngineLimits.from_vllm_config(getattr(state, "vllm_config", None)))
        try:
            if scope["method"] == "POST":
                receive = await _reload_if_edited(state, receive)
            await self.app(scope, receive, send)
        finally:
            ENGINE_LIMITS.reset(token)


async def _reload_if_edited(state, receive):
    """Read the request body; if it names an adapter whose store directory changed since it was loaded, unload it.
    Returns a ``receive`` that replays the body."""
    messages, more = [], True
    while more:
        message = await receive()
        messages.append(message)
        more = message["type"] == "http.request" and message.get("more_body", False)
    resolver = registered_resolver()
    model = _model_named(b"".join(m.get("body", b"") for m in messages))
    if resolver is not None and model is not None and resolver.is_stale(model):
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        # vLLM's own unload (under its per-name lock); a name it no longer holds gets a 404 object, not an error
        await state.openai_serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=model))
        resolver.forget(model)

    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay


def _model_named(body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:  # not JSON: vLLM answers it itself
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else None
