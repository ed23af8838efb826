"""The hostile cases every transport must answer alike, and one runner per transport.

Reusable against any target that serves the loraplex gRPC API and the OpenAI HTTP API
(a `loraplex serve`, or the fleet's proxy): build a `Target` (addresses, a key per role,
the placeholders the cases use), then `for case in CASES: assert run(target, case).kind ==
case.expect` with `run` one of RUNNERS. Outcomes are compared as the front door's kinds
(server/frontdoor/errors.py Kind values), so "403 over HTTP" and "PERMISSION_DENIED over gRPC"
are the same outcome.

Roles a target maps to keys: none (no key), bogus (an unknown key), user (inference, tenant
acme), other_user (inference, tenant beta), tenant_admin (admin, tenant acme), operator
(admin, no tenant). Placeholders: {root} (an allowed register root), {adapter_dir} (a PEFT
directory inside it), {public} (a public adapter id), {private} (acme's private adapter id),
{outside} (a PEFT directory outside every allowed root).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import grpc
import httpx

from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraplex.v1 import generation_pb2 as gen


@dataclass(frozen=True)
class Case:
    """One hostile request: `op` by `role` with `args`; `expect` is a Kind value ("ok" = success)."""

    name: str
    op: str                           # generate | register | delete | list
    role: str
    args: dict = field(default_factory=dict)
    expect: str = "ok"
    hidden: tuple[str, ...] = ()      # placeholders whose values must not appear in the answer


@dataclass(frozen=True)
class Target:
    grpc_address: str
    http_url: str
    keys: dict[str, str | None]
    places: dict[str, str]
    base_model: str = "tiny"


@dataclass(frozen=True)
class Outcome:
    kind: str
    message: str


CASES: tuple[Case, ...] = (
    # authentication and roles
    Case("no key generates", "generate", "none", {"prompt": "Hi"}, "unauthenticated"),
    Case("unknown key generates", "generate", "bogus", {"prompt": "Hi"}, "unauthenticated"),
    Case("inference key registers", "register", "user", {"name": "by-user", "path": "{adapter_dir}"},
         "permission_denied"),
    Case("inference key deletes", "delete", "user", {"name": "{public}"}, "permission_denied"),
    # tenants and public ids (defect 1)
    Case("tenant admin pushes a public id", "register", "tenant_admin", {"name": "{public}", "path": "{adapter_dir}"},
         "permission_denied"),
    Case("tenant admin deletes a public id", "delete", "tenant_admin", {"name": "{public}"}, "permission_denied"),
    Case("other tenant uses a private id", "generate", "other_user", {"prompt": "Hi", "adapter": "{private}"},
         "not_found"),
    Case("other tenant takes a private id", "register", "operator", {"name": "{private}", "path": "{adapter_dir}"},
         "conflict"),
    Case("private without a tenant", "register", "operator",
         {"name": "no-tenant", "path": "{adapter_dir}", "private": True}, "invalid"),
    # register paths (defect 11: no root in the answer)
    Case("register outside the roots", "register", "operator", {"name": "escape", "path": "{outside}"},
         "permission_denied", hidden=("root",)),
    Case("register with '..'", "register", "operator", {"name": "escape", "path": "{root}/../x"},
         "permission_denied"),
    Case("register an empty path", "register", "operator", {"name": "empty", "path": ""}, "invalid"),
    # ids
    Case("generate with a NUL in the id", "generate", "user", {"prompt": "Hi", "adapter": "tone\x00x"}, "invalid"),
    Case("generate with a newline id", "generate", "user", {"prompt": "Hi", "adapter": "{public}\n"}, "invalid"),
    Case("generate with a traversal id", "generate", "user", {"prompt": "Hi", "adapter": "../../etc"}, "invalid"),
    Case("register a traversal id", "register", "operator", {"name": "../x", "path": "{adapter_dir}"}, "invalid"),
    Case("generate an unknown adapter", "generate", "user", {"prompt": "Hi", "adapter": "ghost"}, "not_found"),
    Case("delete an unknown adapter", "delete", "operator", {"name": "ghost"}, "not_found"),
    # request limits (defects 2, 3)
    Case("a prompt over the byte bound", "generate", "user", {"prompt": "word " * 400_000}, "invalid"),
    Case("max_new_tokens over the limit", "generate", "user", {"prompt": "Hi", "max_new_tokens": 10**6}, "invalid"),
    Case("a regex over the constraint limit", "generate", "user", {"prompt": "Hi", "regex": "a" * 70_000}, "invalid"),
    # constraints (defects 6, 7): a 4xx naming the constraint, never an empty success
    Case("a regex whose mask fails", "generate", "user", {"prompt": "Hi", "regex": "(.{1,100}){1,100}"}, "invalid"),
    # and the server keeps serving
    Case("a plain request", "generate", "user", {"prompt": "Hi", "adapter": "{public}"}, "ok"),
    Case("a listing", "list", "other_user", {}, "ok"),
)

GRPC_KINDS = {
    grpc.StatusCode.OK: "ok", grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated", grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.NOT_FOUND: "not_found", grpc.StatusCode.ALREADY_EXISTS: "conflict",
    grpc.StatusCode.FAILED_PRECONDITION: "precondition", grpc.StatusCode.RESOURCE_EXHAUSTED: "exhausted",
    grpc.StatusCode.UNAVAILABLE: "unavailable", grpc.StatusCode.INTERNAL: "internal",
}
HTTP_KINDS = {200: "ok", 400: "invalid", 401: "unauthenticated", 403: "permission_denied", 404: "not_found",
              409: "conflict", 413: "exhausted", 429: "exhausted", 503: "unavailable", 500: "internal"}


def _fill(target: Target, value):
    """`value` with the target's placeholders ({root}, ...) filled in; other braces kept."""
    if isinstance(value, str):
        for name, place in target.places.items():
            value = value.replace("{" + name + "}", place)
    return value


def _args(target: Target, case: Case) -> dict:
    return {name: _fill(target, value) for name, value in case.args.items()}


def run_grpc(target: Target, case: Case) -> Outcome:
    args, key = _args(target, case), target.keys[case.role]
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with grpc.insecure_channel(target.grpc_address, options=[("grpc.max_send_message_length", 2**24)]) as channel:
        adapters = adapters_pb2_grpc.AdapterServiceStub(channel)
        calls: dict[str, Callable[[], object]] = {
            "generate": lambda: generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                gen.GenerateRequest(input=_grpc_input(args)), metadata=metadata, timeout=60),
            "register": lambda: adapters.RegisterAdapter(apb.RegisterAdapterRequest(
                adapter_id=args["name"], path=args["path"], private=args.get("private", False)),
                metadata=metadata, timeout=60),
            "delete": lambda: adapters.DeleteAdapter(apb.DeleteAdapterRequest(adapter_id=args["name"]),
                                                     metadata=metadata, timeout=60),
            "list": lambda: adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=metadata, timeout=60),
        }
        try:
            calls[case.op]()
        except grpc.RpcError as error:
            return Outcome(GRPC_KINDS.get(error.code(), error.code().name), error.details() or "")
    return Outcome("ok", "")


def _grpc_input(args: dict) -> gen.GenerationInput:
    sampling = gen.SamplingParams(max_new_tokens=args.get("max_new_tokens", 2), ignore_eos="regex" not in args)
    if "regex" in args:
        sampling.constraint.regex = args["regex"]
    return gen.GenerationInput(prompt=args["prompt"], adapter_id=args.get("adapter", ""), sampling=sampling)


def run_http(target: Target, case: Case) -> Outcome:
    args, key = _args(target, case), target.keys[case.role]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=target.http_url, headers=headers, timeout=60) as client:
        if case.op == "generate":
            body = {"model": args.get("adapter") or target.base_model, "prompt": args["prompt"],
                    "max_tokens": args.get("max_new_tokens", 2)}
            if "regex" in args:
                body["guided_regex"] = args["regex"]
            else:
                body["ignore_eos"] = True
            reply = client.post("/v1/completions", json=body)
        elif case.op == "register":
            reply = client.post("/v1/load_lora_adapter", json={"lora_name": args["name"], "lora_path": args["path"],
                                                               "private": args.get("private", False)})
        elif case.op == "delete":
            reply = client.post("/v1/unload_lora_adapter", json={"lora_name": args["name"]})
        else:
            reply = client.get("/v1/models")
    if reply.status_code == 200:
        return Outcome("ok", "")
    try:
        message = reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = reply.text
    return Outcome(HTTP_KINDS.get(reply.status_code, str(reply.status_code)), message)


RUNNERS: dict[str, Callable[[Target, Case], Outcome]] = {"grpc": run_grpc, "http": run_http}
