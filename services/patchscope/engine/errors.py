"""Typed errors raised at the engine's boundary.

Each class corresponds to one gRPC status code the service will map it to, so the mapping lives in one
place later and the engine never needs to know about gRPC. Messages name the field, the limit and the value
given, because the caller is usually another program whose author reads only the message.
"""

from __future__ import annotations

import functools


class PatchscopeError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidArgument(PatchscopeError, ValueError):
    """A request field is malformed or out of range (INVALID_ARGUMENT)."""

    def __init__(self, field: str, problem: str, *, limit: str | None = None, value: object = None) -> None:
        self.field = field
        self.problem = problem
        self.limit = limit
        self.value = value
        parts = [f"{field}: {problem}"]
        if limit is not None:
            parts.append(f"allowed: {limit}")
        if value is not None:
            parts.append(f"got: {value!r}")
        super().__init__("; ".join(parts))

    def __reduce__(self):  # keyword-only arguments: errors cross process boundaries (Ray) intact
        return (functools.partial(type(self), limit=self.limit, value=self.value), (self.field, self.problem))


class ModelNotFound(PatchscopeError, LookupError):
    """A model id is neither registered nor a usable local path (NOT_FOUND)."""

    def __init__(self, model_id: str, known: list[str]) -> None:
        self.model_id = model_id
        self.known = known
        super().__init__(f"model {model_id!r} is not registered; known models: {', '.join(sorted(known))}")

    def __reduce__(self):
        return (type(self), (self.model_id, self.known))


class ModelUnavailable(PatchscopeError):
    """A registered model's weights are not installed on this machine (FAILED_PRECONDITION)."""


class UnsupportedArchitecture(PatchscopeError):
    """The model's architecture has no entry in the hook-point table (FAILED_PRECONDITION)."""


class IncompatibleModels(PatchscopeError):
    """Source and target cannot be combined as requested, e.g. cross-model without a mapping."""
