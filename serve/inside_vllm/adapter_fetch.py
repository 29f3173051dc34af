"""Adapters by URL inside vLLM's API server (a vLLM general plugin).

vLLM loads a LoRA adapter from a path on its own host (`/v1/load_lora_adapter`), so an engine
on another host than the gateway that attaches to it could only load what a shared disk put
there. With this plugin, a `lora_path` that is a URL (`<fsspec url of a registry version>
[#<weights sha256>]`, what `RegistryMirror.source` makes) is first copied into a cache folder
of the engine's host (`agentloop.rl.registry_url.engine_copy`: content-addressed, files checked
against the manifest, the manifest against the hash asked for), and vLLM then loads that
folder as it loads any other. Local paths pass through untouched.

Where the copies go: `AGENTLOOP_ENGINE_ADAPTER_DIR`, else `~/.cache/agentloop/engine-adapters`.
A version that is missing at the URL is a 404, one whose hashes do not match a 400, both with
the reason; the load is refused and nothing is loaded. The copy runs in a thread, off the
server's event loop. Only the load route is wrapped: a request naming an adapter never fetches.
"""

from __future__ import annotations

import asyncio
import os
from http import HTTPStatus
from pathlib import Path

CACHE_ENV = "AGENTLOOP_ENGINE_ADAPTER_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "agentloop" / "engine-adapters")


def is_url(lora_path: str | None) -> bool:
    return bool(lora_path) and "://" in lora_path


def register() -> None:
    """Wrap `OpenAIServingModels.load_lora_adapter` (idempotent; a no-op without vLLM's server)."""
    try:
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels, create_error_response
    except ImportError:
        return
    original = OpenAIServingModels.load_lora_adapter
    if getattr(original, "_agentloop_by_url", False):
        return

    async def load_lora_adapter(self, request, base_model_name=None):
        if is_url(request.lora_path):
            from agentloop.rl.registry import RegistryError, VersionNotFound
            from agentloop.rl.registry_url import engine_copy

            try:
                local = await asyncio.to_thread(engine_copy, request.lora_path, cache_dir())
            except VersionNotFound:
                return create_error_response(message=f"No adapter at {request.lora_path}.",
                                             err_type="NotFoundError", status_code=HTTPStatus.NOT_FOUND)
            except (RegistryError, OSError, ValueError) as e:
                return create_error_response(message=f"Adapter {request.lora_path} not fetched: {e}",
                                             err_type="InvalidUserInput", status_code=HTTPStatus.BAD_REQUEST)
            request = request.model_copy(update={"lora_path": str(local)})
        return await original(self, request, base_model_name)

    load_lora_adapter._agentloop_by_url = True
    OpenAIServingModels.load_lora_adapter = load_lora_adapter
