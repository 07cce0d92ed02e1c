"""patchscope-client: the generated gRPC code of the patchscope API and the helpers that read its tensors.

The protobuf modules live once, here, as `patchscope_client._proto` (two generated copies of one proto in a
process fail with "duplicate symbol"); the server imports them from this distribution.
"""

from patchscope_client.version import API_VERSION, compatible

__all__ = ["API_VERSION", "compatible"]
