"""The container images for real: the ones ``make images`` builds, run with rootful podman.

Each image runs ``faastube --help`` as its non-root user; the daemon image runs the
sidecar on the host backend with a read-only root filesystem and no capabilities, and
the function image puts and gets an array through it from another container (the
memfd passes between containers over the socket); the examples image serves the
traffic workflow behind the daemon image's gateway, every container configured from
the operator's own manifests, as in a cluster.

Skipped, with the reason, where podman is missing (CI has none), where it is not
rootful, where the images are not built, and where they were built from other sources
than this checkout: each image carries the digest of its sources
(``io.faastube.image.source-digest``, from ``hack/source_digest.py``), so a stale image
is never tested as if it were this code. ``make image-test`` builds them and runs this.

The first test needs no podman: the image names of the Makefile are the ones the chart,
the operator and the example workflows refer to.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGE_USER = "65532:65532"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SOCKET_DIR = "/var/run/faastube"         # OperatorSettings' default, as in the chart
EXAMPLE = ROOT / "examples" / "traffic"
EXAMPLE_SCALE = "0.05"
READY_TIMEOUT_S = 90.0
# A container that must not write outside its mounts: read-only root, no /tmp either
# unless asked for, no capabilities, no privilege escalation (the chart's sidecar and
# operator securityContext).
LOCKED_DOWN = ["--read-only", "--read-only-tmpfs=false", "--cap-drop=all",
               "--security-opt=no-new-privileges"]
# ... with a writable /tmp, as the chart mounts one (an emptyDir) for the sidecar and the
# operator: CuPy makes its kernel cache directory (CUPY_CACHE_DIR, /tmp/...) on import.
WITH_TMP = [*LOCKED_DOWN, "--tmpfs=/tmp:rw,size=64m"]


def image_names() -> dict[str, str]:
    """``make image-names``: role -> image name, as the Makefile builds them."""
    done = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "image-names"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"make image-names: {done.stderr}"
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def test_the_images_carry_the_names_the_chart_the_operator_and_the_examples_refer_to() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    from faastube_operator.settings import DEFAULT_IMAGE

    names = image_names()
    chart = yaml.safe_load((ROOT / "charts" / "faastube" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts" / "faastube" / "values.yaml").read_text())
    chart_image = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    assert names["daemon"] == chart_image == DEFAULT_IMAGE
    workflow_images = {fn.get("image") for path in sorted((ROOT / "examples").glob("*/workflow.yaml"))
                       for fn in yaml.safe_load(path.read_text())["spec"]["functions"]}
    assert workflow_images == {names["examples"]}
    assert names["function-cuda"] == names["function"] + "-cuda"


# ---------------------------------------------------------------------------------------
# podman


class Podman:
    """Runs podman; removes the containers it started (by their names) at the end."""

    def __init__(self) -> None:
        self.prefix = f"ft-test-{uuid.uuid4().hex[:8]}"
        self.started: list[str] = []

    def __call__(self, *args: str, input_text: str | None = None,
                 timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], capture_output=True, text=True, input=input_text,
                              timeout=timeout_s)

    def run(self, image: str, *args: str, options: tuple[str, ...] = (), entrypoint: str | None = None,
            input_text: str | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        """``podman run --rm``: the command's result."""
        ep = () if entrypoint is None else (f"--entrypoint={entrypoint}",)
        interactive = ("-i",) if input_text is not None else ()
        return self("run", "--rm", *interactive, *options, *ep, image, *args, input_text=input_text,
                    timeout_s=timeout_s)

    def start(self, name: str, image: str, *args: str, options: tuple[str, ...] = ()) -> str:
        """``podman run -d``: a named container in the background."""
        full = f"{self.prefix}-{name}"
        self.started.append(full)
        done = self("run", "-d", "--name", full, *options, image, *args)
        assert done.returncode == 0, done.stderr
        return full

    def logs(self, name: str) -> str:
        done = self("logs", name)
        return (done.stdout + done.stderr)[-4000:]

    def running(self, name: str) -> bool:
        done = self("inspect", "--format", "{{.State.Running}}", name)
        return done.stdout.strip() == "true"

    def stop(self, name: str, *, timeout_s: int = 15) -> int:
        """SIGTERM, then the container's exit code."""
        self("stop", "-t", str(timeout_s), name, timeout_s=timeout_s + 30)
        done = self("inspect", "--format", "{{.State.ExitCode}}", name)
        return int(done.stdout.strip())

    def remove_all(self) -> None:
        for name in reversed(self.started):
            self("rm", "-f", "-t", "2", name, timeout_s=60)
        self.started.clear()


def _why_not_podman() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (`make podman-setup` installs it, as root, on Debian)"
    if os.geteuid() != 0:
        return "the image tests need rootful podman (run as root)"
    info = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                          capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[-300:]}"
    return None


def _source_digest() -> str:
    done = subprocess.run(["python3", str(ROOT / "hack" / "source_digest.py"), str(ROOT)],
                          check=True, capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """The built images of this checkout, or a skip that says what is missing."""
    why = _why_not_podman()
    if why:
        pytest.skip(why)
    names = image_names()
    wanted = {role: names[role] for role in ("daemon", "function", "function-cuda", "examples")}
    missing = [name for name in wanted.values()
               if subprocess.run(["podman", "image", "exists", name], timeout=60).returncode != 0]
    if missing:
        pytest.skip(f"images not built: {', '.join(missing)} (`make images`, or `make image-test`)")
    digest = _source_digest()
    stale = []
    for name in wanted.values():
        label = subprocess.run(
            ["podman", "image", "inspect", "--format",
             '{{index .Config.Labels "io.faastube.image.source-digest"}}', name],
            capture_output=True, text=True, timeout=60).stdout.strip()
        if label != digest:
            stale.append(f"{name} ({label or 'no digest'})")
    if stale:
        pytest.skip(f"images built from other sources than this checkout ({digest}): "
                    f"{', '.join(stale)}; `make images` rebuilds them")
    return wanted


@pytest.fixture
def podman() -> Iterator[Podman]:
    p = Podman()
    try:
        yield p
    finally:
        p.remove_all()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A host directory mounted at the socket path, writable by the images' user."""
    d = Path(tempfile.mkdtemp(prefix="ft-img-", dir="/tmp"))
    os.chown(d, 65532, 65532)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def wait_until(check: Any, what: str, *, timeout_s: float = READY_TIMEOUT_S, diagnose: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s:.0f} s"
                                 + (f":\n{diagnose()}" if diagnose else ""))
        time.sleep(0.2)


def start_sidecar(podman: Podman, image: str, socket_dir: Path, *extra: str,
                  options: tuple[str, ...] = (), locked_down: bool = True) -> str:
    """The sidecar on the host backend; ``locked_down=False``: only ``options`` secure it."""
    name = podman.start(
        "sidecar", image, "--log-level", "INFO", "sidecar", "--backend", "host",
        "--identity", "local", "--socket", f"{SOCKET_DIR}/faastube.sock", "--host-pool-max", "256Mi",
        *extra,
        options=(*(WITH_TMP if locked_down else ()), f"--volume={socket_dir}:{SOCKET_DIR}", *options))
    wait_until(lambda: (socket_dir / "faastube.sock").is_socket() or not podman.running(name),
               "the sidecar's socket", diagnose=lambda: podman.logs(name))
    assert podman.running(name), podman.logs(name)
    return name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_image_runs_faastube_help_as_its_non_root_user(images: dict[str, str],
                                                             podman: Podman) -> None:
    for role, image in images.items():
        config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
        assert config["User"] == IMAGE_USER, (role, config["User"])
        assert config["Entrypoint"] == ["faastube"], (role, config["Entrypoint"])
        done = podman.run(image, options=tuple(LOCKED_DOWN))        # the image's CMD: --help
        assert done.returncode == 0, (role, done.stderr)
        assert "usage: faastube" in done.stdout and "sidecar" in done.stdout, (role, done.stdout)
        ident = podman.run(image, "-u", entrypoint="id")
        assert ident.stdout.strip() == "65532", (role, ident.stdout, ident.stderr)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_daemon_image_has_what_the_sidecar_the_operator_and_the_gateway_import(
        images: dict[str, str], podman: Podman) -> None:
    script = (
        "set -e\n"
        "for c in sidecar operator gateway worker topology place; do faastube $c --help >/dev/null; done\n"
        "python -c 'import cupy, cuda.core, cuda.bindings.driver, pynvml, kopf, kubernetes, grpc, "
        "aiohttp, uvloop, prometheus_client; print(cupy.__version__)'\n"
        # Cross-node passing: NIXL's UCX backend starts (its bundled libraries load in the image).
        "UCX_TLS=tcp python -c 'from faastube_sidecar.network.nixl import Agent; Agent(\"probe\", ucx_tls=\"tcp\")'\n")
    done = podman.run(images["daemon"], "-c", script, entrypoint="sh", options=tuple(WITH_TMP))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_function_images_have_the_light_client_and_none_of_the_daemons_dependencies(
        images: dict[str, str], podman: Podman) -> None:
    probe = ("import importlib.util as u, sys\n"
             "names = ['faastube', 'numpy', 'yaml', 'aiohttp', 'cupy', 'cuda.core', 'kopf', "
             "'kubernetes', 'grpc', 'pynvml', 'uvloop']\n"
             "print(' '.join(n for n in names if u.find_spec(n.split('.')[0]) and "
             "(n.count('.') == 0 or u.find_spec(n))))\n")
    present = {}
    for role in ("function", "function-cuda", "examples"):
        done = podman.run(images[role], "-c", probe, entrypoint="python", options=tuple(LOCKED_DOWN))
        assert done.returncode == 0, done.stderr
        present[role] = set(done.stdout.split())
    light = {"faastube", "numpy", "yaml", "aiohttp"}
    assert present["function"] == light
    assert present["function-cuda"] == present["examples"] == light | {"cupy", "cuda.core", "pynvml"}
    worker = podman.run(images["function"], "worker", "--help", options=tuple(LOCKED_DOWN))
    assert worker.returncode == 0, worker.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_examples_image_gives_each_workflow_the_functions_module_of_its_own_example(
        images: dict[str, str], podman: Podman) -> None:
    show = "import functions; print(functions.__file__, functions.__name__)"
    for env, folder in ((("--env=FAASTUBE_WORKFLOW=traffic",), "traffic"),
                        (("--env=FAASTUBE_WORKFLOW=renamed", "--env=FAASTUBE_EXAMPLE=image"), "image")):
        done = podman.run(images["examples"], "-c", show, entrypoint="python", options=(*LOCKED_DOWN, *env))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [f"/opt/faastube/examples/{folder}/functions.py", "functions"]
    done = podman.run(images["examples"], "-c", show, entrypoint="python",
                      options=(*LOCKED_DOWN, "--env=FAASTUBE_WORKFLOW=renamed"))
    assert done.returncode == 1
    assert "ImportError: no example 'renamed'" in done.stderr
    assert "driving, image, traffic, video" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_image_keeps_the_ca_bundle_that_pip_was_given_during_the_build(
        images: dict[str, str], podman: Podman) -> None:
    if not HOST_CA_BUNDLE.is_file():
        pytest.skip(f"{HOST_CA_BUNDLE} does not exist: the build had no CA bundle to keep")
    bundle = hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest()
    size = HOST_CA_BUNDLE.stat().st_size
    for role, image in images.items():
        config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
        assert not [e for e in config.get("Env") or [] if e.startswith(("PIP_CERT=", "SSL_CERT"))]
        # Every file of the bundle's exact size, hashed: none may be the bundle.
        done = podman.run(image, "-c", f"find / -xdev -type f -size {size}c -exec sha256sum {{}} +; "
                                       "test ! -e /run/secrets/pip-ca",
                          entrypoint="sh")
        assert done.returncode == 0, (role, done.stdout, done.stderr)
        assert bundle not in done.stdout, (role, done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_sidecar_on_a_read_only_root_serves_put_and_get_to_function_containers(
        images: dict[str, str], podman: Podman, socket_dir: Path) -> None:
    sidecar = start_sidecar(podman, images["daemon"], socket_dir, "--metrics-port", "9400")
    # Its metrics server answers inside its own network namespace.
    metrics = podman("exec", sidecar, "python", "-c",
                     "import urllib.request; print(urllib.request.urlopen("
                     "'http://127.0.0.1:9400/metrics', timeout=10).read().decode())")
    assert metrics.returncode == 0 and "faastube_" in metrics.stdout, metrics.stderr
    put_get = (
        "import numpy as np, faastube\n"
        f"c = faastube.connect('{SOCKET_DIR}/faastube.sock', workflow='images', function='probe')\n"
        "a = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)\n"
        "ref = c.put(a, consumers=1)\n"
        "b = np.asarray(c.get(ref))\n"
        "assert b.shape == a.shape and b.dtype == a.dtype and np.array_equal(a, b), 'bytes differ'\n"
        "print('ok', ref)\n")
    for role in ("function", "function-cuda"):
        done = podman.run(images[role], "-c", put_get, entrypoint="python",
                          options=(*LOCKED_DOWN, f"--volume={socket_dir}:{SOCKET_DIR}"))
        assert done.returncode == 0 and done.stdout.startswith("ok "), (role, done.stdout, done.stderr)
    assert podman.running(sidecar), podman.logs(sidecar)
    assert podman.stop(sidecar) == 0, podman.logs(sidecar)   # SIGTERM as PID 1: a clean exit
    assert "stopped" in podman.logs(sidecar)


def security_options(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """A pod's and its container's securityContext as podman flags (the fields the chart
    and the operator set; any other field fails the test rather than being dropped)."""
    flags = []
    merged = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    for key, value in merged.items():
        if key == "runAsUser":
            group = merged.get("runAsGroup", value)
            flags.append(f"--user={value}:{group}")
        elif key == "supplementalGroups":
            flags.extend(f"--group-add={g}" for g in value)
        elif key == "readOnlyRootFilesystem":
            flags.extend(["--read-only", "--read-only-tmpfs=false"] if value else [])
        elif key == "capabilities":
            assert value == {"drop": ["ALL"]}, value
            flags.append("--cap-drop=all")
        elif key == "allowPrivilegeEscalation":
            flags.extend([] if value else ["--security-opt=no-new-privileges"])
        elif key == "seccompProfile":
            assert value == {"type": "RuntimeDefault"}, value    # podman's default profile
        else:
            assert key in ("runAsGroup", "runAsNonRoot"), f"securityContext.{key} not mapped"
    return flags


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_sidecar_as_the_chart_runs_it_serves_only_containers_in_the_socket_group(
        images: dict[str, str], podman: Podman) -> None:
    """The chart's sidecar securityContext (root, no capabilities, read-only root, the
    socket group as a supplemental group) on a root-owned socket directory, as the kubelet
    creates it: the socket goes to the group, the operator's function pods (in the group)
    put and get, a container outside the group is refused."""
    helm = pytest.importorskip("helm_python")
    from faastube_operator import manifests
    from faastube_operator.manifests import Where
    from faastube_operator.settings import OperatorSettings
    from faastube_spec.workflow import load_workflow

    chart = helm.Chart.load(str(ROOT / "charts" / "faastube"))
    try:
        rendered = chart.render(None, name="ft", namespace="faastube", is_install=True)
    finally:
        chart.close()
    (daemonset,) = [d for path, text in rendered.items() if path.endswith(".yaml")
                    for d in yaml.safe_load_all(text) if d and d["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (group,) = [int(a.split("=", 1)[1]) for a in container["args"] if a.startswith("--socket-group=")]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    socket_dir = Path(tempfile.mkdtemp(prefix="ft-img-root-", dir="/tmp"))   # root's, 0755
    try:
        socket_dir.chmod(0o755)
        sidecar = start_sidecar(podman, images["daemon"], socket_dir, "--metrics-port", "0",
                                f"--socket-group={group}",
                                options=(*security_options(pod, container), "--tmpfs=/tmp:rw,size=64m"),
                                locked_down=False)
        st = (socket_dir / "faastube.sock").stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, group, 0o660)

        workflow = load_workflow(EXAMPLE / "workflow.yaml")
        spec = yaml.safe_load((EXAMPLE / "workflow.yaml").read_text())["spec"]
        objs = manifests.workflow_children(
            workflow, namespace="e2e", spec=spec, placement={fn.name: Where("n") for fn in workflow.functions},
            settings=OperatorSettings(image=images["daemon"], socket_group=group))
        fn_pod = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
        fn_options = (*security_options(fn_pod, fn_pod["containers"][0]),
                      f"--volume={socket_dir}:{SOCKET_DIR}")
        assert f"--group-add={group}" in fn_options
        put_get = (
            "import numpy as np, faastube\n"
            f"c = faastube.connect('{SOCKET_DIR}/faastube.sock', workflow='images', function='probe')\n"
            "a = np.arange(4096, dtype=np.int64)\n"
            "assert np.array_equal(np.asarray(c.get(c.put(a, consumers=1))), a)\n"
            "print('ok')\n")
        done = podman.run(images["function"], "-c", put_get, entrypoint="python", options=fn_options)
        assert done.returncode == 0 and done.stdout.strip() == "ok", (done.stdout, done.stderr)
        outsider = podman.run(images["function"], "-c", put_get, entrypoint="python",
                              options=tuple(o for o in fn_options if not o.startswith("--group-add")))
        assert outsider.returncode != 0
        assert "Permission denied" in outsider.stderr, outsider.stderr
        assert podman.stop(sidecar) == 0, podman.logs(sidecar)
    finally:
        podman.remove_all()
        shutil.rmtree(socket_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# A workflow served by the images, configured as the operator configures its pods


def pod_env(container: dict[str, Any], node: str) -> list[str]:
    """A container's env as the kubelet gives it, as podman --env flags."""
    flags = []
    for item in container["env"]:
        if "value" in item:
            flags.append(f"--env={item['name']}={item['value']}")
        else:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, item
            flags.append(f"--env={item['name']}={node}")
    return flags


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_examples_image_serves_the_traffic_workflow_behind_the_daemon_images_gateway(
        images: dict[str, str], podman: Podman, socket_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from faastube_operator import manifests
    from faastube_operator.manifests import Where
    from faastube_operator.settings import OperatorSettings
    from faastube_runtime import cli as run_cli
    from faastube_runtime.bodies import NPY_CONTENT_TYPE
    from faastube_spec.workflow import load_workflow

    node = "node-images"
    workflow = load_workflow(EXAMPLE / "workflow.yaml")
    spec = yaml.safe_load((EXAMPLE / "workflow.yaml").read_text())["spec"]
    settings = OperatorSettings(image=images["daemon"])
    objs = {f"{o['kind']}/{o['metadata']['name']}": o for o in manifests.workflow_children(
        workflow, namespace="e2e", spec=spec, placement={fn.name: Where(node) for fn in workflow.functions},
        settings=settings)}

    # Five workers, each warmed up on a full batch, keep a few 16 MiB host arenas each: more
    # than the 128 MiB quota of the other tests' 256 MiB pool.
    sidecar = start_sidecar(podman, images["daemon"], socket_dir, "--metrics-port", "0", "--host-pool-max", "1Gi")
    # Host networking, so the workers, the gateway and this test meet on loopback; each
    # listens on a port of its own (pods would share a port on different IPs).
    endpoints = []
    workers = []
    for fn in workflow.functions:
        obj = objs[f"Deployment/{manifests.function_deployment_name(workflow.name, fn.name)}"]
        (container,) = obj["spec"]["template"]["spec"]["containers"]
        assert container["image"] == images["examples"], container["image"]
        command = container["command"]
        assert command[:3] == ["faastube", "worker", "--listen"], command
        port = free_port()
        workers.append((podman.start(
            f"fn-{fn.name}", container["image"], *command[1:3], f"tcp://127.0.0.1:{port}",
            options=("--network=host", "--read-only", "--cap-drop=all", "--security-opt=no-new-privileges",
                     f"--volume={socket_dir}:{SOCKET_DIR}", *pod_env(container, node))), port))
        endpoints.append(f"--function-endpoint={fn.name}=http://127.0.0.1:{port}")
    (gateway,) = objs[f"Deployment/{manifests.gateway_name(workflow.name)}"]["spec"]["template"]["spec"][
        "containers"]
    assert gateway["image"] == images["daemon"] and gateway["command"][:2] == ["faastube", "gateway"]
    gateway_port = free_port()
    gateway_name = podman.start(
        "gateway", gateway["image"], "gateway", "--host", "127.0.0.1", "--port", str(gateway_port),
        *endpoints,
        options=("--network=host", *WITH_TMP,
                 f"--volume={socket_dir}:{SOCKET_DIR}", *pod_env(gateway, node)))
    for name, port in [*workers, (gateway_name, gateway_port)]:
        wait_until(lambda n=name, p=port: healthy(f"http://127.0.0.1:{p}/healthz") or not podman.running(n),
                   f"{name} healthy", diagnose=lambda n=name: podman.logs(n))
        assert podman.running(name), podman.logs(name)

    monkeypatch.setenv("FAASTUBE_EXAMPLE_BACKEND", "numpy")
    monkeypatch.setenv("FAASTUBE_EXAMPLE_SCALE", EXAMPLE_SCALE)
    request = run_cli.request_input(workflow, None)
    module = run_cli._import_beside(workflow, "functions")
    expected: Any = request
    for name in workflow.topological_order():
        expected = getattr(module, workflow.function(name).handler_function)(expected)
    body = io.BytesIO()
    np.save(body, request)
    for _ in range(2):
        call = urllib.request.Request(f"http://127.0.0.1:{gateway_port}/invoke", data=body.getvalue(),
                                      method="POST", headers={"Content-Type": NPY_CONTENT_TYPE})
        with urllib.request.urlopen(call, timeout=120) as response:
            assert response.status == 200
            output = np.load(io.BytesIO(response.read()), allow_pickle=False)
        np.testing.assert_allclose(output, np.asarray(expected), rtol=1e-5)

    for name in [gateway_name, *(n for n, _ in workers), sidecar]:
        assert podman.stop(name) == 0, podman.logs(name)
