"""Exit codes of the client commands and the one-line explanation of an SDK error.

0 ok, 1 server error, 2 usage or validation error, 3 not found, 4 authentication or permission,
5 server unavailable, overloaded or too slow. Shared by `loraplex generate/adapters/...` and
`loraplex bench`.
"""

from __future__ import annotations

from .errors import (AdapterNotFoundError, AdapterRejectedError, AuthenticationError, DeadlineExceededError,
                     LoraplexError, OverloadedError, PermissionDeniedError, ServerUnavailableError,
                     ValidationError)

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
_EXIT_CODES: tuple[tuple[type[LoraplexError], int], ...] = (
    (ValidationError, EXIT_USAGE), (AdapterRejectedError, EXIT_USAGE), (AdapterNotFoundError, EXIT_NOT_FOUND),
    (AuthenticationError, EXIT_AUTH), (PermissionDeniedError, EXIT_AUTH), (ServerUnavailableError, EXIT_UNAVAILABLE),
    (OverloadedError, EXIT_UNAVAILABLE), (DeadlineExceededError, EXIT_UNAVAILABLE))


def exit_code(error: LoraplexError) -> int:
    for error_type, code in _EXIT_CODES:
        if isinstance(error, error_type):
            return code
    return EXIT_SERVER


def explain(error: LoraplexError, address: str) -> str:
    """One message a person can act on."""
    if isinstance(error, ServerUnavailableError):
        if error.unreachable:
            return (f"cannot reach loraplex at {address}: is `make serve` running? "
                    f"(or pass --address / set LORAPLEX_ADDRESS) [{error.message}]")
        return f"loraplex at {address} is unavailable: {error.message}; try again shortly"
    if isinstance(error, AuthenticationError):
        return f"{error.message} (pass --api-key or set LORAPLEX_API_KEY)"
    if isinstance(error, PermissionDeniedError):
        return f"permission denied: {error.message}"
    if isinstance(error, OverloadedError):
        wait = f"; retry in {error.retry_after:g}s" if error.retry_after is not None else ""
        return f"server overloaded: {error.message}{wait}"
    if isinstance(error, DeadlineExceededError):
        return f"no answer in time ({error.message}); raise --timeout"
    if isinstance(error, AdapterNotFoundError):
        return f"{error.message} (see `loraplex adapters list`)"
    unlisted = {f: p for f, p in getattr(error, "violations", {}).items() if f"{f}: {p}" not in error.message}
    if unlisted:
        return error.message + "".join(f"\n  {field}: {problem}" for field, problem in unlisted.items())
    return error.message
