"""Errors the client raises.

One class for a failed call (with the server's status code and message), and one sentence for a server
whose API version this client cannot speak.
"""

from __future__ import annotations

import grpc


class PatchscopeError(Exception):
    """Base of every error this client raises on purpose."""


class CallError(PatchscopeError):
    """A call failed; `code` is the gRPC status (INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED, ...)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        self.method, self.code, self.details = method, code, details
        super().__init__(f"{method} failed with {code.name}: {details}")


class IncompatibleServer(PatchscopeError):
    """The server's API version cannot serve this client."""


class MissingExtra(PatchscopeError, ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def from_rpc_error(method: str, error: grpc.RpcError) -> CallError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return CallError(method, code, details or "")


def require(module: str, extra: str):
    """Import an optional module or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed: pip install 'patchscope-client[{extra}]'") from None
