"""Bearer-token authentication inside the ingress (Serve's gRPC proxy has no interceptor hook).

A tokens file (or env var) holds one key per line: `TOKEN` may call every method; `TOKEN Method,Method`
only those (e.g. a production service that may only `ExplainActivations`). Blank lines and `#` comments
are skipped. Every line is validated when the service starts, and a bad one (a line of method names only,
an unknown method, a repeated token, more than two fields) is a startup error naming the file and the
line, never the token. The file is re-read when it changes (rotation without a redeploy); a changed file
that does not validate is logged and the keys in force stay. No valid token is UNAUTHENTICATED, a valid
token calling another method PERMISSION_DENIED; neither message says more.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from patchscope.serve.config import Auth
from patchscope.serve.status import PermissionDenied, Unauthenticated
from patchscope.wire import pb

logger = logging.getLogger("patchscope.serve")
METHODS = frozenset(m.name for m in pb.DESCRIPTOR.services_by_name["Patchscope"].methods)
MIN_TOKEN_CHARS = 8
RECHECK_S = 1.0  # how often the tokens file's size and time are looked at

Key = tuple[bytes, frozenset[str] | None]


def parse_tokens(lines: list[str], source: str) -> list[Key]:
    """The keys of a tokens file's lines; ValueError naming `source` and the line for a bad one."""
    keys: list[Key] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        fields = line.split()
        if len(fields) > 2:
            raise ValueError(
                f"{where}: expected `TOKEN` or `TOKEN Method,Method`, found {len(fields)} fields"
            )
        token = fields[0]
        if "," in token or token in METHODS:
            raise ValueError(f"{where}: starts with method names, not a token (`TOKEN Method,Method`)")
        if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
            raise ValueError(f"{where}: a token is at least {MIN_TOKEN_CHARS} printable ASCII characters")
        allowed: frozenset[str] | None = None
        if len(fields) == 2:
            allowed = frozenset(m for m in fields[1].split(",") if m)
            unknown = sorted(allowed - METHODS)
            if unknown or not allowed:
                names = ", ".join(unknown) or "(none)"
                raise ValueError(f"{where}: unknown method {names}; methods: {', '.join(sorted(METHODS))}")
        if token.encode() in seen:
            raise ValueError(f"{where}: repeats the token of an earlier line")
        seen.add(token.encode())
        keys.append((token.encode(), allowed))
    return keys


class TokenCheck:
    """Accepts `authorization: Bearer <token>` for any configured token, compared in constant time."""

    def __init__(self, lines: list[str], required: bool, source: str = "tokens") -> None:
        self.required = required
        self._keys = parse_tokens(lines, source) if required else []
        if required and not self._keys:
            raise ValueError("authentication is required but no tokens are configured")
        self._file: Path | None = None
        self._env_keys: list[Key] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = time.monotonic()

    @classmethod
    def from_config(cls, auth: Auth) -> TokenCheck:
        """The keys of `auth.tokens_file` and `auth.tokens_env`; the file is watched for changes."""
        if not auth.required:
            return cls([], False)
        env = os.environ.get(auth.tokens_env, "").splitlines() if auth.tokens_env else []
        env_keys = parse_tokens(env, f"${auth.tokens_env}")
        path = Path(auth.tokens_file).expanduser() if auth.tokens_file else None
        lines, source, stamp = cls._read(path)
        file_keys = parse_tokens(lines, source)  # line numbers of the file itself
        check = cls(env + lines, True, "the tokens")  # that there is a key, and no repeat across both
        check._keys = env_keys + file_keys
        check._file, check._env_keys, check._stamp = path, env_keys, stamp
        return check

    @staticmethod
    def _read(path: Path | None) -> tuple[list[str], str, tuple[int, int] | None]:
        if path is None:
            return [], "", None
        stat = path.stat()
        return path.read_text().splitlines(), str(path), (stat.st_mtime_ns, stat.st_size)

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self._file is None or now - self._checked < RECHECK_S:
            return
        self._checked = now
        try:
            stat = self._file.stat()
            if (stat.st_mtime_ns, stat.st_size) == self._stamp:
                return
            lines, source, stamp = self._read(self._file)
            keys = self._env_keys + parse_tokens(lines, source)
            if not keys:
                raise ValueError(f"{source}: holds no tokens")
        except (OSError, ValueError) as error:
            logger.error("tokens file not reloaded, the keys in force stay: %s", error)
            return
        self._keys, self._stamp = keys, stamp
        logger.info("tokens file reloaded: %d keys", len(keys))

    def check(self, metadata: list[tuple[str, str]] | tuple, method: str = "") -> str:
        """The caller's key id (a hash of its token, for quotas and logs; never the token itself)."""
        if not self.required:
            return "anonymous"
        self._reload_if_changed()
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
