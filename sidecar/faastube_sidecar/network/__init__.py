"""Cross-node passing: a sidecar reads objects another node's sidecar holds, over NIXL.

Layers, outer to inner: ``rpc`` (gRPC between sidecars, authenticated by ``auth``) ->
``service`` (the owner: leases and registered spans it lends to peers) and ``reader``
(the consumer's side: a remote get into the local pool) -> ``engine`` (NIXL reads
scheduled per link like every other transfer) -> ``nixl`` (the one module that talks
to the NIXL agent).
"""
