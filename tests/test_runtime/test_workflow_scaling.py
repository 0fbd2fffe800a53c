"""The scaling fields of a function: minReplicas, maxReplicas, targetConcurrency, and replicas among them."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from faastube_spec.workflow import (
    DEFAULT_TARGET_CONCURRENCY,
    MAX_REPLICAS,
    FunctionSpec,
    WorkflowInvalid,
    dump_workflow,
    loads_workflow,
    parse_workflow,
)

BASE: dict[str, Any] = {
    "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w"},
    "spec": {"slo": "1s", "functions": [{"name": "a", "handler": "m:a"},
                                        {"name": "b", "handler": "m:b", "gpu": True}],
             "edges": [{"from": "a", "to": "b", "size": "1MB"}]},
}


def with_b(**fields: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    d["spec"]["functions"][1].update(fields)
    return d


def errors_of(document: Any) -> list[str]:
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(document)
    return [str(e) for e in info.value.errors]


def b_of(**fields: Any) -> FunctionSpec:
    return parse_workflow(with_b(**fields)).function("b")


def test_a_function_without_bounds_keeps_a_fixed_replica_count() -> None:
    b = b_of(replicas=3)
    assert not b.autoscaled
    assert (b.min_replicas, b.max_replicas) == (None, None)
    assert b.replica_range == (3, 3) and b.reserved_replicas == 3
    assert b.target_concurrency == DEFAULT_TARGET_CONCURRENCY == 1.0


def test_all_scaling_fields_are_read_as_given() -> None:
    b = b_of(replicas=2, minReplicas=1, maxReplicas=5, targetConcurrency=4)
    assert b.autoscaled and b.replicas == 2 and b.replica_range == (1, 5)
    assert b.reserved_replicas == 5 and b.target_concurrency == 4.0


@pytest.mark.parametrize(("fields", "expected"), [
    ({"maxReplicas": 4}, (1, 1, 4)),  # min defaults to 1, replicas to max(1, min)
    ({"minReplicas": 0}, (1, 0, 1)),  # scale to zero of one replica
    ({"minReplicas": 3}, (3, 3, 3)),  # max defaults to max(replicas, min)
    ({"minReplicas": 0, "replicas": 0, "maxReplicas": 2}, (0, 0, 2)),  # starts scaled to zero
    ({"minReplicas": 0, "replicas": 3}, (3, 0, 3)),
    ({"maxReplicas": 4, "replicas": 4}, (4, 1, 4)),
    ({"minReplicas": 2, "maxReplicas": 2}, (2, 2, 2)),
])
def test_missing_scaling_fields_take_their_documented_defaults(fields: dict[str, Any],
                                                               expected: tuple[int, int, int]) -> None:
    b = b_of(**fields)
    assert (b.replicas, b.min_replicas, b.max_replicas) == expected


def test_fractional_target_concurrency_is_accepted() -> None:
    assert b_of(maxReplicas=3, targetConcurrency=0.5).target_concurrency == 0.5


@pytest.mark.parametrize(("fields", "message"), [
    ({"minReplicas": -1}, "minReplicas: must be at least 0, got -1"),
    ({"minReplicas": "1"}, "minReplicas: must be an integer, got str"),
    ({"minReplicas": True}, "minReplicas: must be an integer, got boolean"),
    ({"minReplicas": 1.5}, "minReplicas: must be an integer, got float"),
    ({"minReplicas": MAX_REPLICAS + 1},
     "minReplicas: must be at most 2,147,483,647 (a Deployment's limit), got 2,147,483,648"),
    ({"maxReplicas": 0}, "maxReplicas: must be at least 1, got 0"),
    ({"maxReplicas": "4"}, "maxReplicas: must be an integer, got str"),
    ({"maxReplicas": None}, "maxReplicas: must be an integer, got null"),
    ({"maxReplicas": MAX_REPLICAS + 1},
     "maxReplicas: must be at most 2,147,483,647 (a Deployment's limit), got 2,147,483,648"),
    ({"minReplicas": 3, "maxReplicas": 2}, "maxReplicas: must be at least minReplicas (3), got 2"),
    ({"minReplicas": 2, "maxReplicas": 4, "replicas": 1},
     "replicas: must lie within minReplicas..maxReplicas (2..4), got 1"),
    ({"minReplicas": 0, "maxReplicas": 4, "replicas": 5},
     "replicas: must lie within minReplicas..maxReplicas (0..4), got 5"),
    ({"maxReplicas": 4, "replicas": 6}, "replicas: must lie within minReplicas..maxReplicas (1..4), got 6"),
    ({"minReplicas": 2, "replicas": 1}, "replicas: must lie within minReplicas..maxReplicas (2..2), got 1"),
    ({"maxReplicas": 4, "replicas": 0},
     "replicas: must be at least 1, got 0 (0 only with minReplicas: 0, to start scaled to zero)"),
    ({"minReplicas": 1, "replicas": 0},
     "replicas: must be at least 1, got 0 (0 only with minReplicas: 0, to start scaled to zero)"),
    ({"minReplicas": 0, "replicas": -1}, "replicas: must be at least 0, got -1"),
    ({"maxReplicas": 2, "targetConcurrency": 0}, "targetConcurrency: must be a finite number greater than zero, got 0"),
    ({"maxReplicas": 2, "targetConcurrency": -1.5},
     "targetConcurrency: must be a finite number greater than zero, got -1.5"),
    ({"maxReplicas": 2, "targetConcurrency": math.inf},
     "targetConcurrency: must be a finite number greater than zero, got inf"),
    ({"maxReplicas": 2, "targetConcurrency": math.nan},
     "targetConcurrency: must be a finite number greater than zero, got nan"),
    ({"maxReplicas": 2, "targetConcurrency": "2"}, "targetConcurrency: must be a number, got str"),
    ({"maxReplicas": 2, "targetConcurrency": True}, "targetConcurrency: must be a number, got boolean"),
    ({"targetConcurrency": 2},
     "targetConcurrency: only with minReplicas or maxReplicas: a function with fixed replicas does not scale"),
])
def test_every_bad_scaling_field_is_reported_at_its_path(fields: dict[str, Any], message: str) -> None:
    assert errors_of(with_b(**fields)) == [f"spec.functions[1].{message}"]


def test_several_scaling_problems_are_reported_at_once() -> None:
    d = copy.deepcopy(BASE)
    d["spec"]["functions"][0].update(minReplicas=-1, maxReplicas=0)
    d["spec"]["functions"][1].update(targetConcurrency=0)
    assert errors_of(d) == [
        "spec.functions[0].minReplicas: must be at least 0, got -1",
        "spec.functions[0].maxReplicas: must be at least 1, got 0",
        "spec.functions[1].targetConcurrency: must be a finite number greater than zero, got 0",
        "spec.functions[1].targetConcurrency: only with minReplicas or maxReplicas: a function with "
        "fixed replicas does not scale",
    ]


def test_a_misspelt_scaling_field_is_an_unknown_field_with_a_suggestion() -> None:
    assert errors_of(with_b(maxReplica=3)) == [
        "spec.functions[1].maxReplica: unknown field (did you mean 'maxReplicas'?)"]


def test_yaml_documents_carry_the_scaling_fields() -> None:
    text = """
apiVersion: faastube.io/v1alpha1
kind: Workflow
metadata: {name: w}
spec:
  slo: 1s
  functions:
    - {name: a, handler: 'm:a', minReplicas: 0, replicas: 0, maxReplicas: 8, targetConcurrency: 2.5}
"""
    a = loads_workflow(text).function("a")
    assert (a.replicas, a.replica_range, a.target_concurrency) == (0, (0, 8), 2.5)


@pytest.mark.parametrize("fields", [{}, {"replicas": 2}, {"maxReplicas": 4, "targetConcurrency": 3},
                                    {"minReplicas": 0, "replicas": 0, "maxReplicas": 2}])
def test_dump_round_trips_the_scaling_fields(fields: dict[str, Any]) -> None:
    w = parse_workflow(with_b(**fields))
    assert parse_workflow(dump_workflow(w)) == w


def test_a_function_spec_built_in_code_must_be_consistent() -> None:
    with pytest.raises(ValueError, match="both min_replicas and max_replicas"):
        FunctionSpec("f", "m:f", max_replicas=3)
    with pytest.raises(ValueError, match=r"replicas 5 outside \[1, 3\]"):
        FunctionSpec("f", "m:f", replicas=5, min_replicas=1, max_replicas=3)
    with pytest.raises(ValueError, match="no replica ever"):
        FunctionSpec("f", "m:f", replicas=0)
    with pytest.raises(ValueError, match="target_concurrency"):
        FunctionSpec("f", "m:f", min_replicas=1, max_replicas=2, target_concurrency=0)
