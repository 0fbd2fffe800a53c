"""Workflow documents: the model, and every validation rule with the path it reports."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from faastube.errors import InvalidRequest
from faastube_spec.workflow import (
    DEFAULT_GPU_MEMORY_BYTES,
    EdgeSpec,
    FieldError,
    Workflow,
    WorkflowInvalid,
    dump_workflow,
    load_workflow,
    parse_workflow,
)

TRAFFIC: dict[str, Any] = {
    "apiVersion": "faastube.io/v1alpha1",
    "kind": "Workflow",
    "metadata": {"name": "traffic"},
    "spec": {
        "slo": "800ms",
        "functions": [
            {"name": "decode", "handler": "functions:decode", "image": "ghcr.io/faastube/examples:0.1.0"},
            {"name": "preprocess", "handler": "functions:preprocess", "gpu": True},
            {"name": "detection", "handler": "functions:detection", "gpu": {"memory": "8Gi"},
             "replicas": 2, "slo": "300ms", "computeTime": "40ms"},
            {"name": "postprocess", "handler": "functions:postprocess"},
            {"name": "recognition", "handler": "functions:recognition", "gpu": {"memory": "4Gi"}},
        ],
        "edges": [
            {"from": "decode", "to": "preprocess", "size": "130MB"},
            {"from": "preprocess", "to": "detection", "size": "150MB"},
            {"from": "detection", "to": "postprocess", "size": "180MB"},
            {"from": "postprocess", "to": "recognition", "size": 140_000_000},
        ],
    },
}


def doc(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(TRAFFIC)
    d["spec"].update(changes)
    return d


def errors_of(document: Any) -> list[str]:
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(document)
    return [str(e) for e in info.value.errors]


def test_a_valid_document_becomes_the_model_with_units_converted() -> None:
    w = parse_workflow(TRAFFIC)
    assert w.name == "traffic" and w.slo_s == pytest.approx(0.8)
    assert (w.entry, w.exit) == ("decode", "recognition")
    det = w.function("detection")
    assert det.gpu and det.gpu_memory_bytes == 8 * 2**30 and det.replicas == 2
    assert det.slo_s == pytest.approx(0.3) and det.compute_time_s == pytest.approx(0.04)
    assert det.handler_module == "functions" and det.handler_function == "detection"
    assert w.function("preprocess").gpu_memory_bytes == DEFAULT_GPU_MEMORY_BYTES
    decode = w.function("decode")
    assert not decode.gpu and decode.gpu_memory_bytes == 0 and decode.image == "ghcr.io/faastube/examples:0.1.0"
    assert w.edges[0] == EdgeSpec("decode", "preprocess", 130_000_000)
    assert w.edges[3].size_bytes == 140_000_000


def test_graph_queries_follow_the_edges() -> None:
    w = parse_workflow(TRAFFIC)
    assert w.topological_order() == ("decode", "preprocess", "detection", "postprocess", "recognition")
    assert w.successors("detection") == ("postprocess",)
    assert w.predecessors("detection") == ("preprocess",)
    assert w.predecessors("decode") == ()
    assert w.edge("detection", "postprocess").size_bytes == 180_000_000
    with pytest.raises(KeyError):
        w.function("nope")


def test_fan_out_and_fan_in_order_topologically_in_document_order() -> None:
    d = doc(functions=[{"name": n, "handler": f"functions:{n.replace('-', '_')}"}
                       for n in ("agg", "denoise", "c-b", "c-a")],
            edges=[{"from": "denoise", "to": "c-a", "size": "1MB"},
                   {"from": "denoise", "to": "c-b", "size": "1MB"},
                   {"from": "c-a", "to": "agg", "size": "1kB"},
                   {"from": "c-b", "to": "agg", "size": "1kB"}])
    w = parse_workflow(d)
    assert (w.entry, w.exit) == ("denoise", "agg")
    assert w.topological_order() == ("denoise", "c-b", "c-a", "agg")
    assert w.predecessors("agg") == ("c-a", "c-b")


def test_a_single_function_is_both_entry_and_exit() -> None:
    d = doc(functions=[{"name": "only", "handler": "m:f"}], edges=[])
    w = parse_workflow(d)
    assert w.entry == w.exit == "only" and w.edges == ()


def test_dump_round_trips() -> None:
    w = parse_workflow(TRAFFIC)
    assert parse_workflow(dump_workflow(w)) == w


def test_wrong_api_version_and_kind_are_reported() -> None:
    d = doc()
    d["apiVersion"] = "faastube.io/v1"
    d["kind"] = "Workflows"
    assert errors_of(d) == ["apiVersion: must be 'faastube.io/v1alpha1', got 'faastube.io/v1'",
                            "kind: must be 'Workflow', got 'Workflows'"]


def test_missing_metadata_name_is_reported() -> None:
    d = doc()
    d["metadata"] = {}
    assert errors_of(d) == ["metadata.name: required"]
    del d["metadata"]
    assert errors_of(d) == ["metadata: required (with at least metadata.name)"]


def test_names_must_be_dns_labels() -> None:
    d = doc()
    d["metadata"]["name"] = "Traffic_Flow"
    d["spec"]["functions"][0]["name"] = "-decode"
    d["spec"]["functions"][1]["name"] = "p" * 64
    errs = errors_of(d)
    assert any(e.startswith("metadata.name: 'Traffic_Flow' is not a DNS-1123 label") for e in errs)
    assert any(e.startswith("spec.functions[0].name: '-decode' is not a DNS-1123 label") for e in errs)
    assert any(e.startswith("spec.functions[1].name:") and "at most 63" in e for e in errs)


def test_duplicate_function_names_point_at_the_first() -> None:
    d = doc()
    d["spec"]["functions"][3]["name"] = "detection"
    errs = errors_of(d)
    assert "spec.functions[3].name: duplicate function name 'detection' (first at spec.functions[2])" in errs


def test_edges_to_unknown_functions_name_the_end_and_suggest() -> None:
    d = doc()
    d["spec"]["edges"][1]["to"] = "detect"
    errs = errors_of(d)
    assert "spec.edges[1].to: unknown function 'detect' (did you mean 'detection'?)" in errs


def test_self_edges_and_duplicate_edges_are_reported() -> None:
    d = doc()
    d["spec"]["edges"].append({"from": "detection", "to": "detection", "size": "1MB"})
    d["spec"]["edges"].append({"from": "decode", "to": "preprocess", "size": "1MB"})
    errs = errors_of(d)
    assert "spec.edges[4]: self-edge detection -> detection" in errs
    assert "spec.edges[5]: duplicate edge decode -> preprocess (first at spec.edges[0])" in errs


def test_cycles_are_named_end_to_end() -> None:
    d = doc()
    d["spec"]["edges"].append({"from": "postprocess", "to": "preprocess", "size": "1MB"})
    assert errors_of(d) == ["spec.edges: cycle preprocess -> detection -> postprocess -> preprocess"]


def test_several_functions_without_incoming_edges_need_an_entry() -> None:
    d = doc()
    d["spec"]["functions"].append({"name": "audio", "handler": "functions:audio"})
    d["spec"]["edges"].append({"from": "audio", "to": "recognition", "size": "1MB"})
    errs = errors_of(d)
    assert errs == [("spec.entry: ambiguous: several functions have no incoming edges (decode, audio); "
                    "set spec.entry or connect them")]
    d["spec"]["entry"] = "decode"
    errs = errors_of(d)
    assert errs == ["spec.functions[5]: function 'audio' is not reachable from the entry 'decode'"]


def test_several_sinks_need_an_exit_and_an_entry_must_have_no_incoming_edges() -> None:
    d = doc(entry="detection")
    d["spec"]["functions"].append({"name": "archive", "handler": "functions:archive"})
    d["spec"]["edges"].append({"from": "decode", "to": "archive", "size": "1MB"})
    errs = errors_of(d)
    assert "spec.entry: 'detection' has incoming edges (from preprocess); the entry must have none" in errs
    assert ("spec.exit: ambiguous: several functions have no outgoing edges (recognition, archive); "
            "set spec.exit or connect them") in errs


def test_an_explicit_exit_must_be_reached_by_every_function() -> None:
    d = doc(exit="recognition")
    d["spec"]["functions"].append({"name": "archive", "handler": "functions:archive"})
    d["spec"]["edges"].append({"from": "decode", "to": "archive", "size": "1MB"})
    assert errors_of(d) == ["spec.functions[5]: function 'archive' does not lead to the exit 'recognition'"]


def test_unknown_entry_and_exit_are_reported() -> None:
    errs = errors_of(doc(entry="start", exit="end"))
    assert errs == ["spec.entry: unknown function 'start'", "spec.exit: unknown function 'end'"]


@pytest.mark.parametrize("size, message", [
    ("12XB", "unknown size unit 'XB' in '12XB'"),
    ("-5MB", "size must not be negative"),
    (-5, "size must not be negative"),
    (0, "must be greater than zero, got 0"),
    ("0MB", "must be greater than zero"),
    ("lots", "cannot parse size 'lots'"),
    (1.5, "size must be an integer number of bytes"),
    ("1.5B", "is not a whole number of bytes"),
])
def test_bad_edge_sizes_are_reported(size: Any, message: str) -> None:
    d = doc()
    d["spec"]["edges"][2]["size"] = size
    (err,) = errors_of(d)
    assert err.startswith("spec.edges[2].size: ") and message in err


@pytest.mark.parametrize("slo, message", [
    ("fast", "cannot parse duration 'fast'"),
    ("-3ms", "duration must not be negative"),
    ("0", "has no unit"),
    ("0s", "must be greater than zero"),
    ("3 weeks", "unknown duration unit 'weeks'"),
    ("3d", "unknown duration unit 'd'"),
    (800, "duration must be a string with a unit"),
])
def test_bad_durations_are_reported(slo: Any, message: str) -> None:
    (err,) = errors_of(doc(slo=slo))
    assert err.startswith("spec.slo: ") and message in err


def test_function_durations_must_fit_inside_the_slos() -> None:
    d = doc()
    d["spec"]["functions"][2]["computeTime"] = "300ms"
    d["spec"]["functions"][3]["slo"] = "2s"
    d["spec"]["functions"][4]["computeTime"] = "1s"
    errs = errors_of(d)
    assert "spec.functions[2].computeTime: 300ms leaves no time for data passing within the " \
           "function's slo 300ms" in errs
    assert "spec.functions[3].slo: 2s exceeds the workflow's spec.slo 800ms" in errs
    assert "spec.functions[4].computeTime: 1s is not below the workflow's spec.slo 800ms" in errs


@pytest.mark.parametrize("replicas, message", [
    (0, "must be at least 1, got 0 (0 only with minReplicas: 0, to start scaled to zero)"),
    (-2, "must be at least 1, got -2"),
    ("3", "must be an integer, got str"),
    (True, "must be an integer, got boolean"),
])
def test_replicas_must_be_a_positive_integer(replicas: Any, message: str) -> None:
    d = doc()
    d["spec"]["functions"][1]["replicas"] = replicas
    assert errors_of(d) == [f"spec.functions[1].replicas: {message}"]


def test_gpu_memory_on_a_cpu_function_is_reported() -> None:
    d = doc()
    d["spec"]["functions"][0]["gpu"] = {"enabled": False, "memory": "8Gi"}
    d["spec"]["functions"][1]["gpu"] = {"memory": 0}
    d["spec"]["functions"][3]["gpu"] = "yes please"
    errs = errors_of(d)
    assert errs[0].startswith("spec.functions[0].gpu.memory: GPU memory on a CPU function")
    assert errs[1] == "spec.functions[1].gpu.memory: must be greater than zero, got 0"
    assert errs[2].startswith("spec.functions[3].gpu: must be true, false or a mapping")


def test_a_gpu_mapping_with_enabled_false_is_a_cpu_function() -> None:
    d = doc()
    d["spec"]["functions"][1]["gpu"] = {"enabled": False}
    assert not parse_workflow(d).function("preprocess").gpu


@pytest.mark.parametrize("handler", ["functions", "functions:", ":decode", "functions:decode:x",
                                     "my-module:decode", "functions:de code", "functions.decode"])
def test_handlers_must_be_module_colon_function(handler: str) -> None:
    d = doc()
    d["spec"]["functions"][0]["handler"] = handler
    (err,) = errors_of(d)
    assert err.startswith("spec.functions[0].handler: ") and "not 'module:function'" in err


def test_dotted_handler_modules_are_accepted() -> None:
    d = doc()
    d["spec"]["functions"][0]["handler"] = "examples.traffic.functions:decode"
    assert parse_workflow(d).function("decode").handler_module == "examples.traffic.functions"


def test_unknown_fields_are_errors_with_a_suggestion() -> None:
    d = doc(fuctions=[])
    d["spec"]["functions"][1]["replica"] = 4
    d["spec"]["edges"][0]["sizes"] = "1MB"
    d["metadata"]["lables"] = {}
    d["spce"] = {}
    errs = errors_of(d)
    assert "spce: unknown field (did you mean 'spec'?)" in errs
    assert "metadata.lables: unknown field (did you mean 'labels'?)" in errs
    assert "spec.fuctions: unknown field (did you mean 'functions'?)" in errs
    assert "spec.functions[1].replica: unknown field (did you mean 'replicas'?)" in errs
    assert "spec.edges[0].sizes: unknown field (did you mean 'size'?)" in errs


def test_a_custom_resource_read_back_from_the_api_server_is_accepted() -> None:
    d = doc()
    d["metadata"].update(namespace="team-a", uid="0b1c", resourceVersion="42", generation=3,
                         labels={"app": "traffic"}, managedFields=[])
    d["status"] = {"phase": "Running"}
    w = parse_workflow(d)
    assert w.namespace == "team-a"


def test_every_error_is_collected_in_one_pass() -> None:
    d = doc(slo="fast")
    d["kind"] = "Flow"
    d["spec"]["functions"][1]["replicas"] = 0
    d["spec"]["edges"][0]["size"] = "12XB"
    d["spec"]["edges"][1]["to"] = "nowhere"
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(d)
    paths = [e.path for e in info.value.errors]
    assert paths[:5] == ["kind", "spec.slo", "spec.functions[1].replicas", "spec.edges[0].size",
                         "spec.edges[1].to"]
    text = str(info.value)
    assert all(f"{e.path}: {e.message}" in text for e in info.value.errors)
    assert isinstance(info.value, InvalidRequest)


def test_wrong_types_are_reported_not_crashed_on() -> None:
    assert errors_of(["not", "a", "mapping"]) == ["expected a Workflow object (a mapping), got list"]
    d = doc(functions={"decode": {}}, edges="decode->x")
    errs = errors_of(d)
    assert "spec.functions: must be a list, got mapping" in errs
    assert "spec.edges: must be a list, got str" in errs
    d = doc(functions=[])
    assert "spec.functions: must list at least one function" in errors_of(d)
    d = doc()
    d["spec"]["functions"][0] = "decode"
    assert "spec.functions[0]: must be a mapping, got str" in errors_of(d)


def test_field_errors_print_as_path_colon_message() -> None:
    assert str(FieldError("spec.slo", "required")) == "spec.slo: required"


def test_load_workflow_reads_yaml_and_remembers_where_from(tmp_path: Path) -> None:
    path = tmp_path / "workflow.yaml"
    path.write_text(
        "apiVersion: faastube.io/v1alpha1\nkind: Workflow\nmetadata: {name: solo}\n"
        "spec:\n  slo: 1.5s\n  functions:\n    - {name: only, handler: 'functions:only', gpu: {memory: 512MiB}}\n")
    w = load_workflow(path)
    assert isinstance(w, Workflow) and w.slo_s == pytest.approx(1.5)
    assert w.function("only").gpu_memory_bytes == 512 * 2**20
    assert w.source_path == path and w.base_dir == tmp_path


def test_load_workflow_rejects_duplicate_keys_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "workflow.yaml"
    path.write_text("apiVersion: faastube.io/v1alpha1\nkind: Workflow\nkind: Workflow\n")
    with pytest.raises(WorkflowInvalid, match=r"duplicate key 'kind' \(first on line 2\)"):
        load_workflow(path)
    path.write_text("spec: [unclosed\n")
    with pytest.raises(WorkflowInvalid, match="not valid YAML"):
        load_workflow(path)
    with pytest.raises(WorkflowInvalid, match="cannot read"):
        load_workflow(tmp_path / "missing.yaml")


# --- consistency of the messages (issue 15) -------------------------------------------------

def _named(functions: list[str], edges: list[tuple[str, str]]) -> dict[str, Any]:
    return {"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "mine"},
            "spec": {"slo": "1s", "functions": [{"name": n, "handler": f"functions:{n}"} for n in functions],
                     "edges": [{"from": a, "to": b, "size": "1KB"} for a, b in edges]}}


def test_a_function_named_gateway_is_refused_as_reserved() -> None:
    assert errors_of(_named(["pre", "gateway", "post"], [("pre", "gateway"), ("gateway", "post")])) == [
        "spec.functions[1].name: 'gateway' is reserved: the workflow's gateway has that name "
        "(at the sidecar and in its Deployment's name); choose another"]


def test_an_upper_case_function_name_is_one_error_suggesting_lower_case() -> None:
    assert errors_of(_named(["pre", "Embed", "post"], [("pre", "Embed"), ("Embed", "post")])) == [
        "spec.functions[1].name: 'Embed' is not a DNS-1123 label (lower-case letters, digits and '-', "
        "starting and ending with a letter or digit) (did you mean 'embed'?)"]


def test_an_edge_to_a_missing_function_adds_no_follow_on_entry_or_exit_errors() -> None:
    assert errors_of(_named(["a", "b", "c"], [("a", "b"), ("b", "d")])) == [
        "spec.edges[1].to: unknown function 'd'"]
