"""Hostile and very large Workflow documents: each attack ends in a clear error naming its limit.

Timing is not asserted here (see ``bench/workflow_abuse.py``); these tests check that
every way in (a YAML file, text such as a pod's environment variable, a dict such as a
Kubernetes object) refuses each attack with a ``WorkflowInvalid`` that says which limit,
where, and stays short, and that large legitimate workflows are still accepted.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from faastube_spec import documents
from faastube_spec.documents import DEFAULT_LIMITS, DocumentInvalid, check_value, load_yaml, preview
from faastube_spec.units import UnitError, parse_size
from faastube_spec.workflow import (
    GATEWAY_FUNCTION,
    MAX_ERRORS_LISTED,
    RESERVED_FUNCTION_NAMES,
    WorkflowInvalid,
    load_workflow,
    loads_workflow,
    parse_workflow,
)
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
HEAD = "apiVersion: faastube.io/v1alpha1\nkind: Workflow\nmetadata: {name: w}\n"
ONE_FUNCTION = "spec: {slo: 1s, functions: [{name: a, handler: 'm:f'}]}\n"
MAX_NODES = DEFAULT_LIMITS.max_nodes


def _document(functions: list[dict[str, Any]], edges: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "big"},
            "spec": {"slo": "10s", "functions": functions, "edges": edges}}


def _chain(n: int) -> dict[str, Any]:
    return _document([{"name": f"f{i}", "handler": "functions:step"} for i in range(n)],
                     [{"from": f"f{i}", "to": f"f{i + 1}", "size": "1MB"} for i in range(n - 1)])


def _rejected(text: str, tmp_path: Path) -> WorkflowInvalid:
    path = tmp_path / "workflow.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow(path)
    # Whatever the document, the message stays readable: no value is quoted whole.
    assert len(str(info.value)) < 2_000
    return info.value


# --------------------------------------------------------------------------- YAML attacks


def test_an_alias_bomb_is_refused_at_the_value_limit_before_anything_expands_it(tmp_path: Path) -> None:
    # Nine levels of ten aliases: 10**9 values in 400 bytes, quoted whole by kind's error before.
    bomb = ("apiVersion: faastube.io/v1alpha1\nmetadata:\n  name: w\n  annotations:\n"
            "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
            + "".join(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))
            + "kind: *l9\n" + ONE_FUNCTION)
    error = _rejected(bomb, tmp_path)
    # Refused at the fifth level (line 10), where the count first passes the limit.
    assert "line 10, column " in str(error)
    assert f"the document expands to more than {MAX_NODES:,} values " \
           "(the limit of max_nodes; an alias counts as a copy of what it names)" in str(error)


def test_an_alias_inside_the_node_it_names_is_refused_as_recursive(tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: &s {slo: 1s, functions: [*s]}\n", tmp_path)
    assert "alias *s is inside the node it names (a recursive structure)" in str(error)


def test_fifty_thousand_nested_brackets_stop_at_the_depth_limit(tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: {slo: 1s, functions: " + "[" * 50_000 + "\n", tmp_path)
    # libyaml stops at its own bound (1000 levels) while scanning ahead; the parser in Python
    # at ours: either way the message names our limit.
    assert "nested deeper than 64 levels (the limit of max_depth)" in str(error)
    assert "line 4, column " in str(error)


def test_five_thousand_nested_mappings_stop_at_the_depth_limit(tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: {slo: 1s, functions: " + "{a: " * 5_000 + "\n", tmp_path)
    assert "nested deeper than 64 levels (the limit of max_depth)" in str(error)


def test_a_document_over_the_size_limit_is_refused_without_being_parsed(tmp_path: Path) -> None:
    error = _rejected(HEAD + ONE_FUNCTION + "# " + "x" * DEFAULT_LIMITS.max_bytes + "\n", tmp_path)
    assert "larger than 4,194,304 bytes (the limit of max_bytes)" in str(error)


def test_an_endless_file_is_read_only_up_to_the_size_limit() -> None:
    with pytest.raises(WorkflowInvalid, match=r"larger than 4,194,304 bytes \(the limit of max_bytes\)"):
        load_workflow("/dev/zero")


def test_many_small_values_within_the_size_limit_stop_at_the_value_limit(tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: {slo: 1s, functions: [" + "[]," * 1_300_000 + "]}\n", tmp_path)
    assert "the limit of max_nodes" in str(error)


def test_a_scalar_over_the_length_limit_is_refused(tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: {slo: 1s, functions: [{name: a, handler: '" + "m" * 2**20 + ":f'}]}\n",
                      tmp_path)
    assert "a scalar of 1,048,578 characters, longer than 262,144 " \
           "(the limit of max_scalar_chars)" in str(error)


def test_a_long_string_within_the_limit_is_reported_by_its_field_without_being_quoted_whole(
        tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: {slo: 1s, functions: [{name: a, handler: '" + "m." * 100_000 + "'}]}\n",
                      tmp_path)
    assert [e.path for e in error.errors] == ["spec.functions[0].handler"]
    assert "(200,000 characters) is not 'module:function'" in error.errors[0].message
    assert len(error.errors[0].message) < 200


def test_a_long_function_name_is_reported_with_its_length(tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: {slo: 1s, functions: [{name: " + "a" * 100_000 + ", handler: 'm:f'}]}\n",
                      tmp_path)
    assert "is 100,000 characters long; at most 63" in str(error)


def test_an_integer_of_a_hundred_thousand_digits_is_refused_as_beyond_64_bits(tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: {slo: 1s, functions: [{name: a, handler: 'm:f', replicas: "
                      + "9" * 100_000 + "}]}\n", tmp_path)
    assert "an integer of 100,000 characters does not fit in a signed 64-bit integer" in str(error)


def test_integers_beyond_what_kubernetes_holds_are_refused_by_their_field(tmp_path: Path) -> None:
    error = _rejected(HEAD + "spec: {slo: 1s, functions: [{name: a, handler: 'm:f', replicas: 4294967296,"
                      " gpu: {memory: 1e300Gi}}]}\n", tmp_path)
    assert [str(e) for e in error.errors] == [
        "spec.functions[0].gpu.memory: size '1e300Gi' is larger than "
        "9,223,372,036,854,775,807 bytes (2**63 - 1)",
        "spec.functions[0].replicas: must be at most 2,147,483,647 (a Deployment's limit), got 4,294,967,296",
    ]


@pytest.mark.parametrize("how", ["yaml", "dict"])
def test_the_gateways_name_is_reserved(how: str, tmp_path: Path) -> None:
    assert GATEWAY_FUNCTION in RESERVED_FUNCTION_NAMES
    text = HEAD + "spec: {slo: 1s, functions: [{name: a, handler: 'm:f'}, {name: gateway, handler: 'm:g'}]," \
        "\n       edges: [{from: a, to: gateway, size: 1MB}]}\n"
    if how == "yaml":
        error = _rejected(text, tmp_path)
    else:
        with pytest.raises(WorkflowInvalid) as info:
            parse_workflow(yaml.safe_load(text))
        error = info.value
    # Only the name is wrong: the edge to it is not reported as unknown as well.
    assert [str(e) for e in error.errors] == [
        "spec.functions[1].name: 'gateway' is reserved: the workflow's gateway has that name "
        "(at the sidecar and in its Deployment's name); choose another"]


@pytest.mark.parametrize("text, message", [
    ("a: &a {x: 1}\nb: {<<: *a}\n", "merge keys (<<) are not supported"),
    ("a: &a 1\nb: &a 2\n", "anchor &a is defined twice"),
    ("a: *nowhere\n", "alias *nowhere names no anchor before it"),
    ("a: !!python/object:os.system {}\n", "tag tag:yaml.org,2002:python/object:os.system is not supported"),
    ("a: !!python/name:os.system x\n", "tag tag:yaml.org,2002:python/name:os.system is not supported"),
    ("a: !!set {x, y}\n", "tag tag:yaml.org,2002:set is not supported"),
    ("? [a, b]\n: c\n", "a mapping key must be a scalar, not a sequence"),
    ("a: 1\na: 2\n", "duplicate key 'a' (first on line 1)"),
    ("a: !!int twelve\n", "'twelve' is not a valid int"),
    ("a: [1, 2\n", "not valid YAML"),
    ("---\na: 1\n---\nb: 2\n", "expected one YAML document, found 2"),
    ("", "expected one YAML document, found 0"),
    ("a: \udcff", "not valid UTF-8 text: character 3 is '\\udcff'"),
    ("a: \x00", "control characters are not allowed"),
])
def test_what_a_workflow_never_needs_is_refused_with_its_reason(text: str, message: str) -> None:
    with pytest.raises(DocumentInvalid) as info:
        load_yaml(text)
    assert message in str(info.value)


def test_scalars_read_as_yaml_safe_load_reads_them_but_timestamps_stay_strings() -> None:
    text = ("a: [1, -2, 0x1f, 0o17, 017, 0b101, 1_000, '1', 1.5, .inf, 1e3, ~, null, '', yes, No, on, "
            "true, 1:30, !!str 5, !!float 2, x, 1Gi, 2024-01-01]\n")
    got = load_yaml(text)["a"]
    expected = yaml.safe_load(text)["a"]
    assert got[:-1] == expected[:-1]
    assert [type(v) for v in got[:-1]] == [type(v) for v in expected[:-1]]
    assert got[-1] == "2024-01-01"  # as JSON and the API server carry it


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 50_000, "line 1, column 67: nested deeper than 64 levels (the limit of max_depth)"),
    ("a: &a [*a]", "alias *a is inside the node it names"),
    ("a: " + "9" * 5000, "an integer of 5,000 characters does not fit in a signed 64-bit integer"),
])
def test_pyyamls_own_parser_is_used_the_same_way_without_libyaml(
        text: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yaml, "__with_libyaml__", False)
    with pytest.raises(DocumentInvalid) as info:
        load_yaml(text)
    assert message in str(info.value)
    example = (ROOT / "examples" / "traffic" / "workflow.yaml").read_text()
    assert load_yaml(example) == yaml.safe_load(example)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789._:+-eExXbo~aflnrstuyNOTY", min_size=1, max_size=14))
def test_plain_scalars_are_typed_as_yaml_safe_load_types_them(text: str) -> None:
    doc = f"a: {text}\n"
    try:
        expected = yaml.safe_load(doc)
    except yaml.YAMLError:
        return  # not a scalar PyYAML reads either
    if not isinstance(expected, dict) or set(expected) != {"a"}:
        return
    value = expected["a"]
    if isinstance(value, (datetime.date, datetime.datetime)):
        assert load_yaml(doc) == {"a": text}  # timestamps stay strings
    elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        with pytest.raises(DocumentInvalid, match="does not fit in a signed 64-bit integer"):
            load_yaml(doc)
    else:
        got = load_yaml(doc)["a"]
        assert type(got) is type(value)
        assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got))


@pytest.mark.parametrize("example", ["driving", "image", "traffic", "video"])
def test_the_examples_read_the_same_as_with_yaml_safe_load(example: str) -> None:
    text = (ROOT / "examples" / example / "workflow.yaml").read_text()
    assert load_yaml(text) == yaml.safe_load(text)


# --------------------------------------------------------------------------- documents as values


def _nested(depth: int) -> Any:
    value: Any = "1Gi"
    for _ in range(depth):
        value = {"memory": value}
    return value


def test_a_deeply_nested_dict_from_the_api_server_stops_at_the_depth_limit_with_its_path() -> None:
    doc = _document([{"name": "a", "handler": "m:f", "gpu": _nested(100_000)}], [])
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(doc)
    (error,) = info.value.errors
    assert error.message == "nested deeper than 64 levels (the limit of max_depth)"
    assert error.path.startswith("spec.functions[0].gpu.memory.memory.")


def test_shared_and_recursive_references_in_a_dict_count_once_per_use() -> None:
    bomb: Any = ["lol"] * 10
    for _ in range(8):
        bomb = [bomb] * 10
    doc = _document([{"name": "a", "handler": "m:f"}], [])
    doc["kind"] = bomb
    with pytest.raises(WorkflowInvalid, match=f"more than {MAX_NODES:,} values .the limit of max_nodes"):
        parse_workflow(doc)
    loop: dict[str, Any] = {}
    loop["again"] = loop
    doc["kind"] = loop
    with pytest.raises(WorkflowInvalid, match=r"kind(\.again)+: nested deeper than 64 levels"):
        parse_workflow(doc)


def test_a_huge_integer_in_a_dict_is_refused_where_it_is() -> None:
    doc = _document([{"name": "a", "handler": "m:f", "replicas": 10**5000}], [])
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(doc)
    assert [str(e) for e in info.value.errors] == [
        "spec.functions[0].replicas: <an integer of 16610 bits> does not fit in a signed 64-bit integer"]


def test_the_operator_parses_a_custom_resource_through_the_same_limits() -> None:
    from faastube_operator import reconcile

    obj = reconcile.WorkflowObject(name="w", namespace="default", generation=1, status={},
                                   spec={"slo": "1s", "functions": [{"name": "a", "handler": "m:f",
                                                                     "gpu": _nested(10_000)}]})
    with pytest.raises(WorkflowInvalid, match="the limit of max_depth"):
        reconcile.parse(obj)


def test_a_deep_json_document_in_the_environment_stops_at_the_depth_limit() -> None:
    from faastube_runtime import workflow_source

    text = '{"apiVersion": "faastube.io/v1alpha1", "spec": ' + "[" * 50_000 + "]" * 50_000 + "}"
    with pytest.raises(WorkflowInvalid, match=r"\$DOC \(1 error\):\n  nested deeper than 64 levels"):
        workflow_source.parse_document(text, source="$DOC")


@pytest.mark.parametrize("text, message", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": ' + "9" * 5000 + "}", "an integer of 5,000 digits does not fit in a signed 64-bit integer"),
    ("[" + "{}," * 600_000 + "{}]", "mappings and lists (the limit of max_nodes)"),
])
def test_json_documents_meet_the_same_limits(text: str, message: str) -> None:
    with pytest.raises(WorkflowInvalid) as info:
        loads_workflow(text, source="$DOC")
    assert message in str(info.value)


def test_json_text_is_read_as_json_and_yaml_flow_style_as_yaml() -> None:
    doc = _chain(3)
    assert loads_workflow(json.dumps(doc)).entry == "f0"
    flow = "{apiVersion: faastube.io/v1alpha1, kind: Workflow, metadata: {name: w}, " \
           "spec: {slo: 1s, functions: [{name: a, handler: 'm:f'}]}}"
    assert loads_workflow(flow).name == "w"


@pytest.mark.parametrize("value, shown", [
    ("x" * 1000, "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (1,000 characters)"),
    (10**5000, "<an integer of 16610 bits>"),
    (list(range(1000)), "[0, 1, 2, 3, ...]"),
    (_nested(10_000), "{'memory': {'memory': {...}}}"),
], ids=["long string", "huge integer", "long list", "deep mapping"])
def test_preview_quotes_any_value_in_a_few_dozen_characters(value: Any, shown: str) -> None:
    assert preview(value) == shown


def test_preview_survives_recursive_values() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert len(preview(loop)) < 60


def test_check_value_accepts_what_the_limits_allow() -> None:
    check_value(_chain(10_000))
    with pytest.raises(DocumentInvalid) as info:
        check_value({"a": ["x" * 10]}, limits=documents.DocumentLimits(max_scalar_chars=5))
    assert info.value.path == "a[0]" and info.value.limit == "max_scalar_chars"


def test_sizes_beyond_64_bits_are_unit_errors() -> None:
    assert parse_size(2**63 - 1) == 2**63 - 1
    for size in (2**63, "1e300Gi", "9.3e18"):
        with pytest.raises(UnitError, match=r"larger than 9,223,372,036,854,775,807 bytes"):
            parse_size(size)


# --------------------------------------------------------------------------- many errors, big graphs


def test_thousands_of_errors_are_counted_and_the_first_hundred_listed() -> None:
    doc = _chain(10_000)
    doc["spec"]["edges"] = [{"from": f"f{i}", "to": f"f{i}x", "size": "1MB"} for i in range(10_000)]
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(doc)
    error = info.value
    # One per bad edge, and no follow-on entry/exit errors from the graph they leave incomplete.
    assert len(error.errors) == MAX_ERRORS_LISTED and MAX_ERRORS_LISTED + error.omitted == 10_000
    assert f"({MAX_ERRORS_LISTED + error.omitted:,} errors)" in str(error)
    assert str(error).endswith(f"  ... and {error.omitted:,} more")
    # "Did you mean" for the first few, while its budget of comparisons lasts; then plain.
    assert str(error.errors[0]) == "spec.edges[0].to: unknown function 'f0x' (did you mean 'f0'?)"
    assert str(error.errors[99]) == "spec.edges[99].to: unknown function 'f99x'"


def test_a_ten_thousand_function_cycle_is_named_in_a_short_line() -> None:
    doc = _chain(10_000)
    doc["spec"]["edges"].append({"from": "f9999", "to": "f0", "size": "1MB"})
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(doc)
    assert [str(e) for e in info.value.errors] == [
        "spec.edges: cycle f0 -> f1 -> f2 -> f3 -> f4 -> f5 -> f6 -> f7 -> f8 -> ... (9,990 more) "
        "-> f9999 -> f0 (10,000 functions)"]


def test_one_cycle_is_reported_per_strongly_connected_component() -> None:
    names = ["a", "b", "c", "d"]
    pairs = [("a", "b"), ("b", "a"), ("b", "c"), ("c", "d"), ("d", "c"), ("d", "a")]
    doc = _document([{"name": n, "handler": "m:f"} for n in names],
                    [{"from": s, "to": t, "size": "1MB"} for s, t in pairs])
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(doc)
    assert [str(e) for e in info.value.errors] == ["spec.edges: cycle a -> b -> a"]


def test_a_ten_thousand_function_chain_validates_and_keeps_its_order() -> None:
    w = parse_workflow(_chain(10_000))
    assert (w.entry, w.exit) == ("f0", "f9999")
    assert w.topological_order() == tuple(f"f{i}" for i in range(10_000))
    assert w.successors("f5000") == ("f5001",) and w.predecessors("f5000") == ("f4999",)
    assert w.edge("f9998", "f9999").size_bytes == 1_000_000


def test_a_ten_thousand_wide_fan_out_validates(tmp_path: Path) -> None:
    middle = [f"m{i}" for i in range(10_000)]
    doc = _document([{"name": n, "handler": "m:f"} for n in ["source", *middle, "sink"]],
                    [{"from": "source", "to": m, "size": "1MB"} for m in middle]
                    + [{"from": m, "to": "sink", "size": "1MB"} for m in middle])
    w = parse_workflow(doc)
    assert (w.entry, w.exit) == ("source", "sink")
    assert len(w.successors("source")) == 10_000 and len(w.predecessors("sink")) == 10_000
    order = w.topological_order()
    assert order[0] == "source" and order[-1] == "sink" and order[1:-1] == tuple(middle)
    path = tmp_path / "fan-out.json"
    path.write_text(json.dumps(doc))
    assert load_workflow(path) == w


def test_a_ten_thousand_function_chain_with_every_field_set_loads_from_yaml(tmp_path: Path) -> None:
    doc = _chain(10_000)
    for f in doc["spec"]["functions"]:
        f.update(image="ghcr.io/faastube/examples:0.1.0", gpu={"memory": "1Gi"}, replicas=2,
                 slo="500ms", computeTime="20ms")
    lines = [HEAD.replace("name: w", "name: big"), "spec:\n  slo: 10s\n  functions:\n"]
    lines += [f"    - {json.dumps(f)}\n" for f in doc["spec"]["functions"]]
    lines.append("  edges:\n")
    lines += [f"    - {json.dumps(e)}\n" for e in doc["spec"]["edges"]]
    path = tmp_path / "chain.yaml"
    path.write_text("".join(lines))
    assert load_workflow(path) == parse_workflow(doc)
