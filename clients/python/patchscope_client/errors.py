"""Errors the client raises.

`CallError` is a failed call, with the server's status code, message and the request id (from the trailing
metadata `patchscope-request-id`, when the server sent one); each status family has its own subclass, so
callers catch what they can handle (`except ResourceExhausted as e: sleep(e.retry_after)`). Plus one
sentence for a server whose API version this client cannot speak.
"""

from __future__ import annotations

import re

import grpc

REQUEST_ID_KEYS = ("patchscope-request-id", "x-request-id", "request-id")
RETRY_KEYS = ("grpc-retry-pushback-ms", "retry-after-ms")


class PatchscopeError(Exception):
    """Base of every error this client raises on purpose."""


class CallError(PatchscopeError):
    """A call failed; `code` is the gRPC status (INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED, ...)."""

    def __init__(
        self, method: str, code: grpc.StatusCode, details: str, request_id: str | None = None
    ) -> None:
        self.method, self.code, self.details, self.request_id = method, code, details, request_id
        suffix = f" (request {request_id})" if request_id else ""
        super().__init__(f"{method} failed with {code.name}: {details}{suffix}")


class InvalidArgument(CallError):
    """The request is wrong (INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION): fix it, do not retry."""


class NotFound(CallError):
    """A model, mapping or layer the server does not host (NOT_FOUND); the message lists what it hosts."""


class ResourceExhausted(CallError):
    """A limit or quota was hit (RESOURCE_EXHAUSTED); `retry_after` is the server's advice in seconds."""

    def __init__(self, *args, retry_after: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class Unavailable(CallError):
    """The server could not be reached or a replica died (UNAVAILABLE), after the channel's retries."""


class DeadlineExceeded(CallError):
    """The call's deadline passed (DEADLINE_EXCEEDED): one deadline covers every retry of a call."""


class Cancelled(CallError):
    """The call was cancelled (CANCELLED)."""


class Unauthenticated(CallError):
    """No token, or a token the server does not accept (UNAUTHENTICATED)."""


class PermissionDenied(CallError):
    """The token may not do this (PERMISSION_DENIED)."""


class ServerError(CallError):
    """The server failed (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, ABORTED)."""


FAMILIES: dict[grpc.StatusCode, type[CallError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


class IncompatibleServer(PatchscopeError):
    """The server's API version cannot serve this client."""


class MissingExtra(PatchscopeError, ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def _trailers(error: grpc.RpcError) -> dict[str, str]:
    try:
        pairs = error.trailing_metadata() or ()
    except Exception:  # an error raised before any response (e.g. a local one) has none
        return {}
    return {str(k).lower(): v if isinstance(v, str) else v.decode(errors="replace") for k, v in pairs}


def from_rpc_error(method: str, error: grpc.RpcError) -> CallError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    trailers = _trailers(error)
    request_id = next((trailers[k] for k in REQUEST_ID_KEYS if trailers.get(k)), None)
    family = FAMILIES.get(code, ServerError)
    if family is ResourceExhausted:
        pushback = next((trailers[k] for k in RETRY_KEYS if trailers.get(k)), None)
        retry_after = int(pushback) / 1000 if pushback and pushback.isdigit() else None
        if retry_after is None:  # the servers' messages say "retry in N s" where they know when
            match = re.search(r"retry in (\d+(?:\.\d+)?) ?s", details)
            retry_after = float(match.group(1)) if match else None
        return ResourceExhausted(method, code, details, request_id, retry_after=retry_after)
    return family(method, code, details, request_id)


def require(module: str, extra: str):
    """Import an optional module or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed: pip install 'patchscope-client[{extra}]'") from None
