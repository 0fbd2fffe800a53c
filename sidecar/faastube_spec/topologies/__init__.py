"""Simulated topologies shipped as package data; load them with ``faastube_spec.topology.builtin(name)``."""
