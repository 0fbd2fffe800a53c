"""faastube_operator."""
