"""Bearer-token authentication inside the ingress (Serve's gRPC proxy has no interceptor hook).

A tokens file (or env var) holds one key per line: `TOKEN` may call every method; `TOKEN Method,Method`
only those (e.g. a production service that may only `ExplainActivations`). No valid token is
UNAUTHENTICATED, a valid token calling another method PERMISSION_DENIED; neither message says more.
"""

from __future__ import annotations

import hashlib
import hmac

from patchscope.serve.status import PermissionDenied, Unauthenticated


class TokenCheck:
    """Accepts `authorization: Bearer <token>` for any configured token, compared in constant time."""

    def __init__(self, lines: list[str], required: bool) -> None:
        if required and not lines:
            raise ValueError("authentication is required but no tokens are configured")
        self.required = required
        self._keys: list[tuple[bytes, frozenset[str] | None]] = []
        for line in lines:
            token, _, methods = line.strip().partition(" ")
            allowed = frozenset(m.strip() for m in methods.split(",") if m.strip()) or None
            self._keys.append((token.encode(), allowed))

    def check(self, metadata: list[tuple[str, str]] | tuple, method: str = "") -> str:
        """The caller's key id (a hash of its token, for quotas and logs; never the token itself)."""
        if not self.required:
            return "anonymous"
        values = [v for k, v in metadata if k.lower() == "authorization"]
        scheme, _, token = (values[0] if len(values) == 1 else "").partition(" ")
        given = token.strip().encode()
        # Every configured token is compared (no early exit), so timing says nothing about which matched.
        allowed: frozenset[str] | None = frozenset()
        matched = False
        for expected, methods in self._keys:
            if hmac.compare_digest(given, expected):
                matched, allowed = True, methods
        if scheme.lower() != "bearer" or not given or not matched:
            raise Unauthenticated("missing or invalid bearer token in the `authorization` metadata")
        if allowed is not None and method not in allowed:
            raise PermissionDenied(f"this key may not call {method}")
        return "key-" + hashlib.sha256(given).hexdigest()[:12]
