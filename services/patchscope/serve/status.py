"""Errors → gRPC status codes, in one place.

The engine and mapping raise typed errors that know nothing of gRPC; this table gives each its code and
the reason the rejection counter (`patchscope_rejections_total`) records. Errors that cross a deployment
boundary arrive wrapped by Ray and are unwrapped first. Anything not in the table is INTERNAL with a
generic message: internals are logged, never sent. A call the client cancels or whose deadline passes
ends by cancellation, not here: gRPC answers it itself, and Serve's proxy counts it by code.
"""

from __future__ import annotations

import logging
import re
from typing import NamedTuple

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
from patchscope.serve.metrics import rejections
from patchscope.serve.quotas import QuotaExceeded, QuotaUnavailable
from patchscope.wire import pb

logger = logging.getLogger("patchscope.serve")


class Unauthenticated(PatchscopeError):
    """No valid bearer token (UNAUTHENTICATED); the message never says which part was wrong."""


class PermissionDenied(PatchscopeError):
    """A valid key calling a method its line in the tokens file does not list (PERMISSION_DENIED)."""


class Rule(NamedTuple):
    """An error class, its status code, and the reason the rejection counter records."""

    kind: type[BaseException]
    code: grpc.StatusCode
    reason: str


RULES: list[Rule] = [
    Rule(InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    Rule(ModelNotFound, grpc.StatusCode.NOT_FOUND, "model_not_found"),
    Rule(MappingNotFound, grpc.StatusCode.NOT_FOUND, "mapping_not_found"),
    Rule(MappingIncompatible, grpc.StatusCode.FAILED_PRECONDITION, "mapping_incompatible"),
    Rule(MappingCorrupt, grpc.StatusCode.FAILED_PRECONDITION, "mapping_corrupt"),
    Rule(IncompatibleModels, grpc.StatusCode.FAILED_PRECONDITION, "incompatible_models"),
    Rule(ModelUnavailable, grpc.StatusCode.FAILED_PRECONDITION, "model_unavailable"),
    Rule(UnsupportedArchitecture, grpc.StatusCode.FAILED_PRECONDITION, "unsupported_architecture"),
    Rule(QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full"),
    Rule(QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota"),
    Rule(BackPressureError, grpc.StatusCode.RESOURCE_EXHAUSTED, "backpressure"),
    Rule(QuotaUnavailable, grpc.StatusCode.UNAVAILABLE, "quota_unavailable"),
    Rule(Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    Rule(PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "permission_denied"),
    Rule(DeploymentUnavailableError, grpc.StatusCode.UNAVAILABLE, "replica_unavailable"),
    Rule(ActorDiedError, grpc.StatusCode.UNAVAILABLE, "replica_unavailable"),
    Rule(ActorUnavailableError, grpc.StatusCode.UNAVAILABLE, "replica_unavailable"),
    Rule(RayActorError, grpc.StatusCode.UNAVAILABLE, "replica_unavailable"),
]
INTERNAL = "internal"
REASONS = frozenset(rule.reason for rule in RULES) | {INTERNAL}


def _request_fields() -> frozenset[str]:
    """Field paths of the API's request messages, one or two deep (`layers`, `target.generation`)."""
    paths: set[str] = set()
    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        if not name.endswith("Request"):
            continue
        for f in message.fields:
            paths.add(f.name)
            if f.message_type is not None:
                paths.update(f"{f.name}.{g.name}" for g in f.message_type.fields)
    return frozenset(paths)


REQUEST_FIELDS = _request_fields()
OTHER_FIELD = "other"


def field_label(field: str) -> str:
    """The request field an INVALID_ARGUMENT names, as a label from a closed set.

    Indices go (`vectors[3].shape` is `vectors`), the path is cut to the longest prefix of at most two
    names that the API's request messages have, and anything else (an internal name) is `other`: the
    label's values are bounded by the proto, never by what a caller sends.
    """
    parts = re.sub(r"\[[^\]]*\]", "", field).split(".")
    for depth in (2, 1):
        candidate = ".".join(parts[:depth])
        if len(parts) >= depth and candidate in REQUEST_FIELDS:
            return candidate
    return OTHER_FIELD


def unwrap(error: BaseException) -> BaseException:
    """The original error behind Ray's task-error wrappers."""
    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    return error


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the message a client may see; counts the rejection by code and reason.

    The servicer calls this once for every call that fails, so this is where rejections are counted:
    by code, a reason from `REASONS`, and for INVALID_ARGUMENT the field (`field_label`).
    """
    cause = unwrap(error)
    code, message, reason = _classify(cause)
    field = field_label(cause.field) if isinstance(cause, InvalidArgument) else ""
    rejections.count(code.name, reason, field)
    return code, message


def _classify(cause: BaseException) -> tuple[grpc.StatusCode, str, str]:
    for kind, code, reason in RULES:
        if isinstance(cause, kind):
            if isinstance(cause, QuotaUnavailable):
                return code, str(cause), reason
            if code == grpc.StatusCode.UNAVAILABLE:
                return code, "a model replica is unavailable (restarting?); retry the request", reason
            if isinstance(cause, BackPressureError):
                message = f"{cause.message}; the service is at capacity, retry after a short backoff"
                return code, message, reason
            return code, str(cause), reason
    logger.error("internal error: %s", type(cause).__name__, exc_info=cause)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(cause).__name__}); see the server log", INTERNAL
