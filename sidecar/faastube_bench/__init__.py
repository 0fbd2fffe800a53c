"""faastube_bench."""
