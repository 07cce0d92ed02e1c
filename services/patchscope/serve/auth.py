"""Bearer-token authentication inside the ingress (Serve's gRPC proxy has no interceptor hook)."""

from __future__ import annotations

import hashlib
import hmac

from patchscope.serve.status import Unauthenticated


class TokenCheck:
    """Accepts `authorization: Bearer <token>` for any configured token, compared in constant time."""

    def __init__(self, tokens: list[str], required: bool) -> None:
        if required and not tokens:
            raise ValueError("authentication is required but no tokens are configured")
        self.required = required
        self._tokens = [t.encode() for t in tokens]

    def check(self, metadata: list[tuple[str, str]] | tuple) -> str:
        """The caller's key id (a hash of its token, for quotas and logs; never the token itself)."""
        if not self.required:
            return "anonymous"
        values = [v for k, v in metadata if k.lower() == "authorization"]
        scheme, _, token = (values[0] if len(values) == 1 else "").partition(" ")
        given = token.strip().encode()
        # Every configured token is compared (no early exit), so timing says nothing about which matched.
        matched = False
        for expected in self._tokens:
            matched |= hmac.compare_digest(given, expected)
        if scheme.lower() != "bearer" or not given or not matched:
            raise Unauthenticated("missing or invalid bearer token in the `authorization` metadata")
        return "key-" + hashlib.sha256(given).hexdigest()[:12]
