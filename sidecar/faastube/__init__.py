"""FaaSTube: GPU-efficient data passing for serverless inference workflows.

    import faastube
    client = faastube.connect()              # the node's sidecar, $FAASTUBE_SOCKET
    ref = client.put(array, consumers=1)
    array = client.get(ref)

    @faastube.function
    def detect(frames):                      # a workflow function (see docs/runtime.md)
        out = faastube.output(frames.shape, frames.dtype)   # pool memory: returned without a copy
        ...
"""

from faastube.client import Client, ObjectInfo, Writable, connect
from faastube.errors import (
    FaastubeError,
    InvalidRequest,
    ObjectNotReady,
    OutOfPoolMemory,
    PermissionDenied,
    RefNotFound,
    RetryableError,
    Unavailable,
)
from faastube.sdk import function, output

__all__ = [
    "Client", "FaastubeError", "InvalidRequest", "ObjectInfo", "ObjectNotReady", "OutOfPoolMemory",
    "PermissionDenied", "RefNotFound", "RetryableError", "Unavailable", "Writable", "connect", "function", "output",
]
