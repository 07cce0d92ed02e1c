"""What every RPC of the servicer does around its body: authenticate, stamp, take a quota slot, map errors.

One decorator, so that no method can forget a step: the API version goes out in the trailing metadata of
every call, the token is checked before anything else, a quota lease is held for the call's whole life
(a stream's included) and released however it ends, and any error becomes its status code in one place
(`status.py`). In a streaming method the code is set on the context *and* the error raised, since
returning after setting it reaches the client as OK.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from patchscope.serve.status import status_of
from patchscope_client.version import API_VERSION, METADATA_KEY

logger = logging.getLogger("patchscope.serve")
STREAMING = frozenset({"ExtractHiddenStates", "Explain", "ExplainActivations"})


def rpc(method: Callable) -> Callable:
    """Authenticate, stamp the API version, take a quota slot, and turn errors into status codes.

    `self` is the servicer: its `auth` (a `TokenCheck`) and `quotas` (None, or a `QuotaClient`). Serve's
    gRPC proxy passes the context only to a method whose signature names `grpc_context` (read
    through `functools.wraps`), so every RPC and wrapper uses that name.
    """

    async def begin(self: Any, context) -> tuple[str, str] | None:
        context.set_trailing_metadata([(METADATA_KEY, API_VERSION)])
        key = self.auth.check(context.invocation_metadata(), method.__name__)
        if self.quotas is None:
            return None
        return await self.quotas.acquire(key)  # a lease; QuotaExceeded or QuotaUnavailable

    def fail(error: BaseException, context) -> None:
        code, message = status_of(error)
        context.set_code(code)
        context.set_details(message)
        logger.info("rpc %s failed: %s", method.__name__, code.name)

    def end(self: Any, key: tuple[str, str] | None) -> None:
        if key is not None:
            self.quotas.release(key)

    if method.__name__ in STREAMING:

        @functools.wraps(method)
        async def stream(self: Any, request, grpc_context):
            key = None
            try:
                key = await begin(self, grpc_context)
                # aclosing: a caller that leaves closes the inner generators now, not at garbage collection.
                async with contextlib.aclosing(method(self, request, grpc_context)) as messages:
                    async for message in messages:
                        yield message
            except Exception as error:
                fail(error, grpc_context)
                raise
            finally:
                end(self, key)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request, grpc_context):
        key = None
        try:
            key = await begin(self, grpc_context)
            return await method(self, request, grpc_context)
        except Exception as error:
            fail(error, grpc_context)
            raise
        finally:
            end(self, key)

    return unary
