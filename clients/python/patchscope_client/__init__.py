"""patchscope-client: a light client for the patchscope explanation service (no torch, no Ray).

    from patchscope_client import PatchscopeClient

    with PatchscopeClient("127.0.0.1:9000") as client:
        table = client.explain_table("smollm2-135m", "Barack Obama", [2, 6, 10], target="gemma3-270m")
        for row in table.rows:
            print(row.site.source_layer, row.answer)

The generated protobuf code lives once, here, as `patchscope_client._proto` (two generated copies of one
proto in a process fail with "duplicate symbol"); the server imports it from this distribution.
"""

from patchscope_client.aio import AsyncPatchscopeClient
from patchscope_client.client import PatchscopeClient
from patchscope_client.errors import CallError, IncompatibleServer, MissingExtra, PatchscopeError
from patchscope_client.types import (
    Control,
    Event,
    Extraction,
    Finished,
    LayerStates,
    MappingInfo,
    ModelInfo,
    ResultTable,
    Site,
    SiteResult,
    Started,
    Token,
    collect,
)
from patchscope_client.version import API_VERSION, compatible

__version__ = "0.1.0"
__all__ = [
    "API_VERSION",
    "AsyncPatchscopeClient",
    "CallError",
    "Control",
    "Event",
    "Extraction",
    "Finished",
    "IncompatibleServer",
    "LayerStates",
    "MappingInfo",
    "MissingExtra",
    "ModelInfo",
    "PatchscopeClient",
    "PatchscopeError",
    "ResultTable",
    "Site",
    "SiteResult",
    "Started",
    "Token",
    "collect",
    "compatible",
]
