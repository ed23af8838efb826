"""GET /v1/models and the vLLM-style adapter endpoints (load / unload), over the same store calls
as the gRPC AdapterService (validation, allowed register roots, tenants, eviction)."""

from __future__ import annotations

import asyncio
from typing import Any

from ..engine.validation import ADAPTER_REF_RE
from ..service.state import ServiceState
from .errors import ApiError, bad_request
from .schemas import LoadLoraRequest, UnloadLoraRequest


def _card(model_id: str, created: int, owned_by: str, root: str, parent: str | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "root": root,
            "parent": parent}


def _adapter_cards(store: Any, tenant: str | None, base_name: str) -> list[dict[str, Any]]:
    """`name` (latest READY version) and `name@N` for every READY version the tenant may see."""
    from ...adapters_store.errors import AdapterNotFound
    from ...adapters_store.records import AdapterState

    cards = []
    for latest in store.list(tenant):
        try:
            _, versions = store.get(latest.name, tenant)
        except AdapterNotFound:                         # deleted meanwhile
            continue
        ready = []
        for version in versions:
            try:
                record = store.resolve(f"{latest.name}@{version}", tenant)
            except AdapterNotFound:
                continue
            if record.state is AdapterState.READY:
                ready.append(record)
        if not ready:
            continue
        owner = ready[-1].owner or "loraplex"
        cards.append(_card(latest.name, int(ready[-1].created_at), owner, ready[-1].key, base_name))
        cards += [_card(r.key, int(r.created_at), r.owner or "loraplex", r.key, base_name) for r in ready]
    return cards


async def list_models(state: ServiceState, tenant: str | None, base_name: str, started: int) -> dict[str, Any]:
    data = [_card(base_name, started, "loraplex", base_name, None)]
    if state.store is not None:
        data += await asyncio.to_thread(_adapter_cards, state.store, tenant, base_name)
    return {"object": "list", "data": data}


def _check_name(name: str, param: str) -> None:
    if not ADAPTER_REF_RE.match(name) or "@" in name:
        raise bad_request(param, "must be an adapter name matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _writable_store(state: ServiceState) -> Any:
    if state.draining:
        raise ApiError(503, "the server is shutting down")
    if state.store is None:
        raise ApiError(503, "the adapter store is not open yet", headers={"Retry-After": "1"})
    return state.store


async def load_adapter(state: ServiceState, body: LoadLoraRequest, tenant: str | None) -> str:
    """Register a PEFT directory under an allowed root (admin); returns the success line."""
    _check_name(body.lora_name, "lora_name")
    if body.private and tenant is None:
        raise bad_request("private", "private adapters need a key with a tenant ('tenant:key')")
    store = _writable_store(state)
    record = await asyncio.to_thread(store.register_path, body.lora_name, body.lora_path,
                                     owner=tenant if body.private else None)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully (version {record.version})."


async def unload_adapter(state: ServiceState, body: UnloadLoraRequest, tenant: str | None) -> str:
    """Delete every version of the adapter (admin) and drop its device slots."""
    _check_name(body.lora_name, "lora_name")
    store = _writable_store(state)
    deleted = await asyncio.to_thread(store.delete, body.lora_name, tenant)
    if state.engine is not None:
        await state.engine.evict_adapters([f"{body.lora_name}@{v}" for v in deleted])
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
