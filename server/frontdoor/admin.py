"""Adapter administration, the same for every transport: register, upload, delete, list, get.

Every write passes the caller's tenant to the store (which applies the public/private rule,
at start and again at commit); deletes wait for in-flight requests without holding a thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..engine.validation import ADAPTER_REF_RE
from .access import Operation, Principal, authorize, owner_for
from .door import FrontDoor
from .errors import Problem, Refusal, Kind

NAME_RULE = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


def name_problems(ref: str, field: str, allow_version: bool) -> list[Problem]:
    """An adapter id's problems (`name`, or `name@N` where versions are allowed)."""
    if isinstance(ref, str) and ADAPTER_REF_RE.fullmatch(ref) and (allow_version or "@" not in ref):
        return []
    form = "'name' or 'name@version'" if allow_version else "'name'"
    return [Problem(field, f"must be {form} with name matching {NAME_RULE}")]


def raise_problems(problems: list[Problem]) -> None:
    if problems:
        summary = "; ".join(f"{p.field}: {p.description}" for p in problems)
        raise Refusal(Kind.INVALID, f"invalid request: {summary}", tuple(problems))


async def register(door: FrontDoor, principal: Principal | None, name: str, path: str, private: bool = False,
                   allow_base_mismatch: bool = False) -> Any:
    """Register a PEFT directory under an allowed root (or an allowed s3:// source); the record."""
    caller = authorize(principal, Operation.REGISTER)
    problems = name_problems(name, "adapter_id", allow_version=False)
    if not path:
        problems.append(Problem("path", "must name a directory under an allowed register root, or "
                                        "s3://bucket/path/ under an allowed adapter source"))
    raise_problems(problems)
    owner = owner_for(caller, private)
    store = door.writable_store()
    return await door.on_store(lambda: store.register_path(name, path, owner=owner,
                                                           allow_base_mismatch=allow_base_mismatch,
                                                           tenant=caller.tenant))


async def delete(door: FrontDoor, principal: Principal | None, ref: str) -> list[int]:
    """Delete `name` (every version) or `name@N`; waits for in-flight requests holding no thread,
    then frees their device slots. A cancelled caller does not cancel the removal."""
    caller = authorize(principal, Operation.DELETE)
    raise_problems(name_problems(ref, "adapter_id", allow_version=True))
    store = door.writable_store()
    deleted, removals = await door.on_store(store.begin_delete, ref, caller.tenant)
    await asyncio.shield(asyncio.gather(*(asyncio.wrap_future(removal) for removal in removals)))
    engine = door.backends.engine
    if engine is not None:
        name = ref.split("@", 1)[0]
        await engine.evict_adapters([f"{name}@{version}" for version in deleted])
    return list(deleted)


async def list_adapters(door: FrontDoor, principal: Principal | None) -> list[Any]:
    """One record per visible name (latest version)."""
    caller = authorize(principal, Operation.READ_ADAPTERS)
    store = door.store()
    return await door.on_listing(store.list, caller.tenant)


async def list_versions(door: FrontDoor, principal: Principal | None) -> list[Any]:
    """Every READY version the caller may see, from one registry query (sorted by name, version)."""
    from ...adapters_store.records import AdapterState

    caller = authorize(principal, Operation.READ_ADAPTERS)
    store = door.store()
    records = await door.on_listing(store.list_versions, caller.tenant)
    return [record for record in records if record.state is AdapterState.READY]


async def get_adapter(door: FrontDoor, principal: Principal | None, ref: str) -> tuple[Any, list[int]]:
    caller = authorize(principal, Operation.READ_ADAPTERS)
    raise_problems(name_problems(ref, "adapter_id", allow_version=True))
    store = door.store()
    return await door.on_store(store.get, ref, caller.tenant)


async def reset_prefix_cache(door: FrontDoor, principal: Principal | None) -> bool:
    """Drop every cached prefix block no running request holds (admin); True when done."""
    authorize(principal, Operation.RESET_CACHE)
    return await door.engine().reset_prefix_cache()


async def begin_upload(door: FrontDoor, principal: Principal | None, meta_of: Any) -> Any:
    """An upload session for `meta_of(tenant)` (the store checks sizes, quota and ownership)."""
    caller = authorize(principal, Operation.UPLOAD)
    store = door.writable_store()
    return await door.on_store(store.begin_upload, meta_of(caller.tenant))
