"""The Kubernetes API FaaSTube serves its resources under: one place for the group,
the version and the kinds, so that a new version is one edit (and the CRDs)."""

from __future__ import annotations

from typing import Final

GROUP: Final = "faastube.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

WORKFLOW_KIND: Final = "Workflow"
WORKFLOW_PLURAL: Final = "workflows"
GPUNODE_KIND: Final = "GpuNode"
GPUNODE_PLURAL: Final = "gpunodes"
# Not served by the API server: the document ``faastube topology`` writes and
# ``faastube place --nodes`` reads (GpuNodes carry one node's part of it).
TOPOLOGY_KIND: Final = "Topology"
