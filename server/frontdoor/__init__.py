"""The front door: one transport-neutral request and admin path under gRPC and HTTP.

Transports (service/ gRPC servicers, http/ FastAPI routes, the fleet's replica) authenticate
a caller into a `Principal`, decode their wire format, call one function here, and translate
the result or the `Refusal` back (a `Kind` -> their status, one table per transport):

    access.authorize(principal, Operation)        roles; UNAUTHENTICATED / PERMISSION_DENIED
    access.owner_for(principal, private)          public / private (tenant) ownership
    generation.admit(door, principal, prompts, n) prompts x n bound, before any work
    generation.check(request, limits)             the engine's validator, before queueing
    tokens.tokenize / tokens.detokenize           byte / id bounds, on the tokenizer thread
    admin.register / delete / list_adapters / list_versions / get_adapter / begin_upload
                                                  tenant passed to the store; waits hold no thread
    errors.refusal_of(error)                      any error -> Refusal (unknown: INTERNAL, logged)

`FrontDoor` (door.py) holds the live parts and the pools that keep size-dependent work off
the event loop. The engine is reached only through EngineClient members.
"""

from .access import ANONYMOUS_ADMIN, Operation, Principal, Role, authorize, owner_for
from .door import FrontDoor
from .errors import Kind, Problem, Refusal, invalid, refusal_of
from .limits import FrontLimits

__all__ = ["ANONYMOUS_ADMIN", "FrontDoor", "FrontLimits", "Kind", "Operation", "Principal", "Problem", "Refusal",
           "Role", "authorize", "invalid", "owner_for", "refusal_of"]
