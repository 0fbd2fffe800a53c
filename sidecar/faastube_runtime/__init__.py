"""faastube_runtime."""
