"""The generated protobuf code, imported from the one copy the client distribution ships.

Two generated copies of one proto in a process fail with "duplicate symbol", so the server never generates
its own: every module of the wire imports `pb` and `pb_grpc` from here.
"""

from __future__ import annotations

from patchscope_client._proto import patchscope_pb2 as pb
from patchscope_client._proto import patchscope_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
