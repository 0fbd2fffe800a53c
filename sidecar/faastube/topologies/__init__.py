"""Simulated topologies shipped as package data; load them with ``faastube.topology.builtin(name)``."""
