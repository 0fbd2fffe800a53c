"""The fixtures the operator tests share: an emulated API server and the operators started on it.

``kube_emulator`` needs kmock, so it is imported only when a fixture runs: the modules that
use these fixtures skip themselves without kmock, and the other e2e tests don't need it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kube_emulator import Cluster, OperatorProcess


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    from kube_emulator import emulated_cluster

    async with emulated_cluster(tmp_path) as c:
        yield c


@pytest.fixture
async def operators(cluster: Cluster) -> AsyncIterator[list[OperatorProcess]]:
    """Append the operators a test starts; they are stopped before the cluster goes."""
    started: list[OperatorProcess] = []
    yield started
    for operator in started:
        await operator.stop()
