"""What the operator, the sidecar and the runtime all read: the Workflow and Topology
models, units, the GpuNode document, and the API group and version they are served
under. Pure (stdlib and PyYAML); not imported by the light client (``faastube``), so
a function's image does not load it to put and get.
"""
