"""Configuration of the cluster entrypoints: addresses, env vs flags, every problem named."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import pytest
from faastube_runtime import discovery, errors, gateway_cli, worker_cli
from faastube_runtime.addresses import Address, parse_address, parse_host_port
from faastube_spec.workflow import WorkflowInvalid

DOC = {"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w"},
       "spec": {"slo": "1s", "functions": [{"name": "a", "handler": "m:a"},
                                           {"name": "b", "handler": "m:b", "gpu": True}],
                "edges": [{"from": "a", "to": "b", "size": 1}]}}
ENV = {"FAASTUBE_WORKFLOW_DOCUMENT": json.dumps(DOC), "FAASTUBE_WORKFLOW": "w",
       "FAASTUBE_FUNCTION": "b", "FAASTUBE_HANDLER": "m:b", "FAASTUBE_SOCKET": "/run/ft/s.sock",
       "FAASTUBE_GPU_INDEX": "3", "FAASTUBE_NAMESPACE": "team"}


def _args(module: Any, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:/tmp/w.sock", Address.unix("/tmp/w.sock")),
    ("/tmp/w.sock", Address.unix("/tmp/w.sock")),
    ("tcp://10.0.0.7:8081", Address.tcp("10.0.0.7", 8081)),
    ("http://fn.ns.svc:80/", Address.tcp("fn.ns.svc", 80)),
    ("tcp://[fd00::1]:8081", Address.tcp("fd00::1", 8081)),
])
def test_addresses_parse_in_every_documented_form(text: str, expected: Address) -> None:
    assert parse_address(text, field="f") == expected


def test_addresses_print_back_and_build_urls() -> None:
    assert str(Address.tcp("fd00::1", 8081)) == "tcp://[fd00::1]:8081"
    assert Address.tcp("fd00::1", 8081).base_url == "http://[fd00::1]:8081"
    assert Address.unix("/s").base_url == "http://worker"
    assert parse_host_port("svc.ns.svc:8081", field="f") == ("svc.ns.svc", 8081)


@pytest.mark.parametrize(("text", "listen", "message"), [
    ("", False, "empty address"),
    ("tcp://host", False, "no port"),
    ("tcp://host:0", False, "port 0"),
    ("tcp://host:99999", True, "bad port"),
    ("http://host:1", True, "not an address"),  # listening takes tcp:// only
    ("ftp://host:1", False, "not an address"),
    ("http://host:1/call", False, "has a path"),
    ("tcp://u:p@host:1", False, "user info"),
    ("unix:" + "x" * 200, False, "longer than 107 bytes"),
])
def test_bad_addresses_are_refused_naming_the_field(text: str, listen: bool, message: str) -> None:
    with pytest.raises(errors.BadInput, match=f"--x: .*{message}"):
        parse_address(text, field="--x", listen=listen)


def test_worker_takes_everything_from_the_operators_environment() -> None:
    config = worker_cli.build_config(_args(worker_cli, "--listen", "tcp://0.0.0.0:8081"), ENV)
    assert (config.function, config.gpu_index, config.device) == ("b", 3, None)
    assert config.sidecar_socket == "/run/ft/s.sock" and config.namespace == "team"
    assert config.listen == Address.tcp("0.0.0.0", 8081) and config.workflow.name == "w"


def test_worker_flags_win_over_the_environment() -> None:
    config = worker_cli.build_config(_args(worker_cli, "--listen", "/tmp/a.sock", "--function", "a",
                                           "--sidecar", "/tmp/s.sock", "--gpu-index", ""),
                                     {**ENV, "FAASTUBE_HANDLER": "", "FAASTUBE_GPU_INDEX": ""})
    assert (config.function, config.sidecar_socket, config.gpu_index) == ("a", "/tmp/s.sock", None)


def test_worker_reports_every_configuration_problem_at_once() -> None:
    env = {**ENV, "FAASTUBE_FUNCTION": "a", "FAASTUBE_HANDLER": "m:other", "FAASTUBE_SOCKET": ""}
    with pytest.raises(errors.BadInput) as caught:
        worker_cli.build_config(_args(worker_cli, "--listen", "tcp://h"), env)
    text = str(caught.value)
    assert "$FAASTUBE_HANDLER='m:other' but the workflow document gives function 'a' the handler 'm:a'" in text
    assert "--listen: no port in 'h'" in text
    assert "--sidecar: not given and $FAASTUBE_SOCKET is not set" in text
    assert "$FAASTUBE_GPU_INDEX: function 'a' is not a GPU function" in text


def test_worker_refuses_an_unknown_function_and_a_document_of_another_workflow() -> None:
    with pytest.raises(errors.BadInput, match="has no function 'zz' \\(it has a, b\\)"):
        worker_cli.build_config(_args(worker_cli, "--listen", "/tmp/a.sock", "--function", "zz"), ENV)
    with pytest.raises(errors.BadInput, match="FAASTUBE_WORKFLOW='other' but the workflow document is named 'w'"):
        worker_cli.build_config(_args(worker_cli), {**ENV, "FAASTUBE_WORKFLOW": "other"})
    with pytest.raises(errors.BadInput, match="no workflow: pass --workflow FILE or set FAASTUBE_WORKFLOW_DOCUMENT"):
        worker_cli.build_config(_args(worker_cli), {})


def test_a_broken_workflow_document_names_the_variable_and_the_field() -> None:
    broken = json.loads(json.dumps(DOC))
    broken["spec"]["functions"][1]["replicas"] = 0
    with pytest.raises(WorkflowInvalid) as caught:
        worker_cli.build_config(_args(worker_cli), {**ENV, "FAASTUBE_WORKFLOW_DOCUMENT": json.dumps(broken)})
    assert "$FAASTUBE_WORKFLOW_DOCUMENT" in str(caught.value)
    assert "spec.functions[1].replicas" in str(caught.value)
    with pytest.raises(WorkflowInvalid, match="expected a Workflow object"):
        worker_cli.build_config(_args(worker_cli), {**ENV, "FAASTUBE_WORKFLOW_DOCUMENT": "[1, 2]"})


def test_worker_cli_exits_2_with_the_message(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    assert worker_cli.run(_args(worker_cli, "--listen", "tcp://x:1")) == 2
    assert "faastube worker: no workflow" in capsys.readouterr().err


def test_gateway_takes_endpoints_and_services_per_function() -> None:
    settings = gateway_cli.build_settings(
        _args(gateway_cli, "--function-endpoint", "a=unix:/tmp/a0.sock", "--function-endpoint",
              "a=http://10.0.0.1:8081", "--function-service", "b=w-b.team.svc:8081"), ENV)
    assert settings.endpoints == {"a": (Address.unix("/tmp/a0.sock"), Address.tcp("10.0.0.1", 8081))}
    assert settings.services == (discovery.ServiceTarget("b", "w-b.team.svc", 8081),)
    assert settings.namespace == "team" and settings.sidecar_socket == "/run/ft/s.sock"


def test_gateway_reports_every_replica_source_problem() -> None:
    with pytest.raises(errors.BadInput) as caught:
        gateway_cli.build_settings(_args(
            gateway_cli, "--function-endpoint", "a=tcp://h:1", "--function-endpoint", "b=tcp://h:1",
            "--function-service", "a=s:1", "--function-endpoint", "nope", "--function-service", "zz=s:1",
            "--port", "70000", "--retries", "-1"), ENV)
    text = str(caught.value)
    assert "tcp://h:1 is already a replica of 'a'" in text
    assert "function 'a': give either --function-endpoint or --function-service, not both" in text
    assert "--function-endpoint: 'nope' is not NAME=VALUE" in text
    assert "has no function 'zz'" in text
    assert "no replicas for function(s) b" in text
    assert "--port: must be in 0..65535" in text and "--retries: must be 0 or more" in text


def test_gateway_limits_come_from_flags_with_units() -> None:
    settings = gateway_cli.build_settings(
        _args(gateway_cli, "--function-endpoint", "a=tcp://h:1", "--function-endpoint", "b=tcp://h:2",
              "--max-body-size", "300MiB", "--max-input-in-flight", "2GiB", "--header-timeout", "5",
              "--body-idle-timeout", "2.5", "--body-timeout", "60"), ENV)
    config = settings.gateway
    assert config.limits.max_body_bytes == 300 << 20 and config.max_input_bytes_in_flight == 2 << 30
    assert (config.limits.header_timeout_s, config.limits.body_idle_timeout_s,
            config.limits.body_timeout_s) == (5.0, 2.5, 60.0)
    assert config.problems() == []


def test_gateway_limits_that_cannot_work_are_refused_by_flag() -> None:
    with pytest.raises(errors.BadInput) as caught:
        gateway_cli.build_settings(_args(
            gateway_cli, "--function-endpoint", "a=tcp://h:1", "--function-endpoint", "b=tcp://h:2",
            "--max-body-size", "2GiB", "--max-input-in-flight", "1GiB", "--header-timeout", "0",
            "--body-timeout", "inf"), ENV)
    text = str(caught.value)
    assert "--max-input-in-flight (1GiB) must be at least --max-body-size (2GiB)" in text
    assert "--header-timeout: must be a positive number of seconds, got 0.0" in text
    assert "--body-timeout: must be a positive number of seconds, got inf" in text


class _Sink:
    def __init__(self) -> None:
        self.sets: list[tuple[str, list[Address]]] = []

    def set_replicas(self, function: str, addresses: Any) -> None:
        self.sets.append((function, list(addresses)))


class _FlakyResolver:
    def __init__(self) -> None:
        self.fail = False

    async def resolve(self, host: str) -> list[str]:
        if self.fail:
            raise discovery.ResolveFailed(f"resolving {host!r}: server unreachable")
        return {"a.svc": ["10.0.0.2", "10.0.0.1"]}.get(host, [])


async def test_discovery_applies_answers_and_keeps_replicas_when_a_lookup_fails() -> None:
    sink, resolver = _Sink(), _FlakyResolver()
    targets = [discovery.ServiceTarget("a", "a.svc", 8081), discovery.ServiceTarget("b", "b.svc", 8081)]
    disco = discovery.ServiceDiscovery(sink, targets, resolver=resolver, interval_s=0.01)
    await disco.refresh()
    assert sink.sets == [("a", [Address.tcp("10.0.0.2", 8081), Address.tcp("10.0.0.1", 8081)]),
                         ("b", [])]  # no records: no ready pod, no replica
    resolver.fail = True
    await disco.refresh()
    assert len(sink.sets) == 2  # nothing applied: the known replicas stay
    async with disco:
        rounds = disco.rounds
        while disco.rounds < rounds + 2:
            await asyncio.sleep(0.01)


async def test_the_system_resolver_asks_libc() -> None:
    assert "127.0.0.1" in await discovery.SystemResolver().resolve("localhost")
