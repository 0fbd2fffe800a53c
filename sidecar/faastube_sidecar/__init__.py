"""faastube_sidecar."""
