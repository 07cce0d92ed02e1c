"""Errors → gRPC status codes, in one place.

The engine and mapping raise typed errors that know nothing of gRPC; this table gives each its code.
Errors that cross a deployment boundary arrive wrapped by Ray and are unwrapped first. Anything not in
the table is INTERNAL with a generic message: internals are logged, never sent.
"""

from __future__ import annotations

import logging

import grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from patchscope.engine.errors import (
    IncompatibleModels,
    InvalidArgument,
    ModelNotFound,
    ModelUnavailable,
    PatchscopeError,
    UnsupportedArchitecture,
)
from patchscope.mapping.artefact import MappingCorrupt, MappingIncompatible
from patchscope.mapping.registry import MappingNotFound
from patchscope.serve.batching import QueueFull
from patchscope.serve.quotas import QuotaExceeded, QuotaUnavailable

logger = logging.getLogger("patchscope.serve")


class Unauthenticated(PatchscopeError):
    """No valid bearer token (UNAUTHENTICATED); the message never says which part was wrong."""


class PermissionDenied(PatchscopeError):
    """A valid key calling a method its line in the tokens file does not list (PERMISSION_DENIED)."""


CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (MappingNotFound, grpc.StatusCode.NOT_FOUND),
    (MappingIncompatible, grpc.StatusCode.FAILED_PRECONDITION),
    (MappingCorrupt, grpc.StatusCode.FAILED_PRECONDITION),
    (IncompatibleModels, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsupportedArchitecture, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackPressureError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QuotaUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (DeploymentUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ActorDiedError, grpc.StatusCode.UNAVAILABLE),
    (ActorUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RayActorError, grpc.StatusCode.UNAVAILABLE),
]


def unwrap(error: BaseException) -> BaseException:
    """The original error behind Ray's task-error wrappers."""
    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    return error


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the message a client may see."""
    cause = unwrap(error)
    for kind, code in CODES:
        if isinstance(cause, kind):
            if isinstance(cause, QuotaUnavailable):
                return code, str(cause)
            if code == grpc.StatusCode.UNAVAILABLE:
                return code, "a model replica is unavailable (restarting?); retry the request"
            if isinstance(cause, BackPressureError):
                return code, f"{cause.message}; the service is at capacity, retry after a short backoff"
            return code, str(cause)
    logger.error("internal error: %s", type(cause).__name__, exc_info=cause)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(cause).__name__}); see the server log"
