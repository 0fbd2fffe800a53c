"""`faastube sidecar`: flags -> SidecarSettings -> app.serve."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import NoReturn

from faastube import errors, protocol
from faastube_spec.units import format_size, parse_duration, parse_rate, parse_size

from faastube_sidecar.dataplane import (
    DEFAULT_GPU_LIMITS,
    DEFAULT_HOST_LIMITS,
    DEFAULT_MEMORY_POLICY,
    DEFAULT_TTL_S,
)
from faastube_sidecar.elastic import POLICIES, MemoryPolicy
from faastube_sidecar.network.peers import parse_peer_flag
from faastube_sidecar.pool import PoolLimits

DEFAULT_SOCKET = "/var/run/faastube/faastube.sock"
DEFAULT_SIMULATED_GPU_BYTES = 4 << 30


def _size(text: str) -> int:
    try:
        return parse_size(int(text) if text.isdigit() else text)
    except errors.InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except errors.InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except errors.InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (e.g. 0660)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode must be between 000 and 777, got {text!r}")
    if mode & 0o007:
        raise argparse.ArgumentTypeError(f"mode {text} lets every local user connect; leave 'other' out "
                                         "(use --socket-group for the functions' group)")
    return mode


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    import grp

    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


def _share(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r} (e.g. 0.5 or 50%)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=os.environ.get("FAASTUBE_SOCKET", DEFAULT_SOCKET),
                        help="Unix socket path, in a directory of its own that pods mount "
                             "(default: $FAASTUBE_SOCKET or %(default)s)")
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto",
                        help="cuda: GPU pools; host: shared memory only; auto: cuda when a GPU is visible")
    parser.add_argument("--metrics-port", type=_port, default=0, help="Prometheus port (0: off)")
    parser.add_argument("--metrics-host", default="0.0.0.0")
    gpu, host = DEFAULT_GPU_LIMITS, DEFAULT_HOST_LIMITS
    parser.add_argument("--gpu-pool-max", type=_size, default=gpu.max_bytes, metavar="SIZE",
                        help=f"most memory the pools of each GPU may reserve, all workflows together "
                             f"(default {format_size(gpu.max_bytes)})")
    parser.add_argument("--gpu-quota", type=_size, metavar="SIZE",
                        help="most memory one workflow's pool may reserve on each GPU (default: "
                             "half of --gpu-pool-max)")
    parser.add_argument("--gpu-pool-min", type=_size, default=gpu.min_bytes, metavar="SIZE",
                        help="memory each workflow's pool keeps reserved on a GPU when idle (default 0)")
    parser.add_argument("--gpu-slab", type=_size, default=gpu.slab_bytes, metavar="SIZE",
                        help=f"growth step of the sidecar's own GPU slabs (default {format_size(gpu.slab_bytes)})")
    parser.add_argument("--gpu-arena", type=_size, default=gpu.arena_bytes, metavar="SIZE",
                        help=f"smallest GPU arena a function writes its outputs in "
                             f"(default {format_size(gpu.arena_bytes)})")
    parser.add_argument("--host-pool-max", type=_size, default=host.max_bytes, metavar="SIZE",
                        help=f"most host (pinned) memory the pools may reserve (default {format_size(host.max_bytes)})")
    parser.add_argument("--host-quota", type=_size, metavar="SIZE",
                        help="most host memory one workflow may reserve (default: half of --host-pool-max)")
    parser.add_argument("--host-slab", type=_size, default=host.slab_bytes, metavar="SIZE")
    parser.add_argument("--host-arena", type=_size, default=host.arena_bytes, metavar="SIZE",
                        help=f"smallest host arena (default {format_size(host.arena_bytes)})")
    parser.add_argument("--idle-release", type=_duration, default=gpu.idle_release_s, metavar="DURATION",
                        help=f"empty slabs idle this long are given back (default {gpu.idle_release_s:g}s)")
    parser.add_argument("--default-ttl", type=_duration, default=DEFAULT_TTL_S, metavar="DURATION",
                        help=f"lifetime of objects put without a ttl (default {DEFAULT_TTL_S:g}s)")
    memory = parser.add_argument_group("Memory policy (docs/sidecar.md, Memory)")
    mp = DEFAULT_MEMORY_POLICY
    memory.add_argument("--memory-policy", choices=POLICIES, default=mp.name,
                        help="static: keep-alive pools up to --gpu-pool-max, a full pool fails puts; elastic: "
                             "keep what the traffic needs, capped by the GPU's free memory; elastic+eviction: "
                             "and move objects out of a full GPU, those read last in the queue first, back "
                             "before their turn; lru: eviction by least recent use, back when read "
                             f"(default {mp.name})")
    memory.add_argument("--pool-floor", type=_size, default=mp.floor_bytes, metavar="SIZE",
                        help=f"elastic: memory the pools of a GPU keep when idle (shared by the workflows "
                             f"there) while a quarter or more of the GPU is free "
                             f"(default {format_size(mp.floor_bytes)})")
    memory.add_argument("--pool-cap-share", type=_share, default=mp.cap_share, metavar="FRACTION",
                        help=f"elastic: the pools of a GPU hold at most this share of its free memory plus "
                             f"what they hold (default {mp.cap_share:g})")
    memory.add_argument("--evict-wait", type=_duration, default=mp.evict_wait_s, metavar="DURATION",
                        help=f"a put waits at most this long for objects to move out of a full GPU "
                             f"(default {mp.evict_wait_s:g}s)")
    memory.add_argument("--restore-ahead", type=_count, default=mp.restore_ahead, metavar="N",
                        help=f"evicted objects come back when their reader is this many places from the "
                             f"front of its queue, or sooner when memory allows (default {mp.restore_ahead})")
    memory.add_argument("--simulated-gpus", type=_count, metavar="N",
                        help="with --backend host: N GPU locations made of shared memory (development, "
                             "tests and the benchmark's CPU mode)")
    memory.add_argument("--simulated-gpu-memory", type=_size, metavar="SIZE",
                        help="with --simulated-gpus: each simulated GPU's memory (default 4Gi)")
    memory.add_argument("--simulated-gpu-busy", type=_size, metavar="SIZE",
                        help="with --simulated-gpus: memory other processes hold on each (default 0)")
    parser.add_argument("--max-clients", type=_positive_int, default=8192,
                        help="connections open at once (default 8192; the open-file limit is raised to fit)")
    parser.add_argument("--socket-mode", type=_mode, default=0o660, metavar="MODE",
                        help="permissions of the socket file, octal (default 0660: the sidecar's user and "
                             "--socket-group; function pods get that group)")
    parser.add_argument("--socket-group", type=_group, metavar="GROUP",
                        help="group (name or gid) that may connect (default: the sidecar's own group)")
    parser.add_argument("--hello-timeout", type=_duration, default=5.0, metavar="DURATION",
                        help="close connections that have not said hello by then (default 5s)")
    parser.add_argument("--max-frame", type=_size, default=1 << 20, metavar="SIZE",
                        help="largest request body accepted (default 1Mi)")
    parser.add_argument("--no-copy-events", action="store_true",
                        help="GPU gets wait for their copy in the sidecar instead of ordering the "
                             "consumer's stream after it with an inter-process event")
    parser.add_argument("--no-multipath", action="store_true",
                        help="large copies take one link: host<->GPU only the target GPU's own PCIe "
                             "link, GPU<->GPU only the direct link (no relay GPUs)")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="event loop: uvloop when installed, else asyncio")
    parser.add_argument("--spin-us", type=float, default=0.0, metavar="US",
                        help="busy-poll the sockets this long before sleeping (lower latency, one busy core; "
                             "uses the asyncio loop; default 0)")
    parser.add_argument("--identity", choices=("local", "kubernetes"), default="local",
                        help="local: trust what clients claim; kubernetes: attest each peer's pod")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                        help="this Kubernetes node's name (default $NODE_NAME)")
    parser.add_argument("--proc-root", metavar="DIR",
                        help="with --identity kubernetes: procfs of the host's pid namespace, "
                             "where peers' cgroups are read (default /proc)")
    kube = parser.add_argument_group("Kubernetes")
    kube.add_argument("--device-plugin", action="store_true",
                      help="register faastube.io/gpu-<index> resources with the kubelet")
    kube.add_argument("--kubelet-dir", metavar="DIR",
                      help="the kubelet's device-plugin directory (default /var/lib/kubelet/device-plugins)")
    kube.add_argument("--sharing-slots", type=_positive_int, metavar="N",
                      help="functions that may share one GPU (devices per GPU resource; default: "
                           "the topology's, 4 for discovered GPUs)")
    kube.add_argument("--gpu-exposure", choices=("envvar", "cdi", "cdi-annotations"),
                      help="with --device-plugin: how a function gets its GPU: envvar "
                           "(NVIDIA_VISIBLE_DEVICES, for the NVIDIA runtime; default), cdi (a CDI "
                           "device, injected by containerd/CRI-O; Kubernetes >= 1.29) or "
                           "cdi-annotations (the same as an annotation, for older kubelets)")
    kube.add_argument("--cdi-kind", metavar="VENDOR/CLASS",
                      help="with a cdi exposure: the CDI kind of the node's GPU spec "
                           "(default nvidia.com/gpu, what nvidia-ctk cdi generate writes)")
    kube.add_argument("--cdi-device-name", choices=("uuid", "index"),
                      help="with a cdi exposure: how that spec names a GPU (default uuid)")
    kube.add_argument("--cdi-spec-dir", action="append", metavar="DIR",
                      help="with a cdi exposure: where the runtime reads CDI specs (repeatable; "
                           "default /etc/cdi and /var/run/cdi); a GPU no spec defines is unhealthy")
    kube.add_argument("--socket-devices", type=_positive_int, metavar="N",
                      help="with --device-plugin: also offer faastube.io/socket, N devices that "
                           "give pods without a GPU the socket directory (no hostPath needed)")
    kube.add_argument("--publish-node", action="store_true",
                      help="keep this node's GpuNode resource (topology, health, pool memory) current")
    kube.add_argument("--heartbeat", type=_duration, metavar="DURATION",
                      help="with --publish-node: how often the GpuNode status is patched (default 10s)")
    kube.add_argument("--simulated-topology", metavar="NAME",
                      help="use a built-in topology instead of NVML discovery (tests, development)")
    kube.add_argument("--kubeconfig", metavar="PATH",
                      help="Kubernetes client config (default: in-cluster when "
                           "$KUBERNETES_SERVICE_HOST is set, else $KUBECONFIG or ~/.kube/config)")
    net = parser.add_argument_group("Cross-node passing (docs/network.md)")
    net.add_argument("--peer-port", type=_port, metavar="PORT",
                     help="serve reads of this node's objects to other nodes' sidecars on PORT (0: any "
                          "free port), and fetch refs naming other nodes; needs --node-name and "
                          "--peer-secret-file")
    net.add_argument("--peer-host", metavar="ADDRESS", help="address the peer service listens on (default 0.0.0.0)")
    net.add_argument("--peer-secret-file", metavar="PATH",
                     help="the secret every sidecar of the cluster shares (>= 32 bytes; a Kubernetes Secret)")
    net.add_argument("--advertise-address", metavar="ADDRESS",
                     help="the address other sidecars dial (published in the GpuNode; default $POD_IP)")
    net.add_argument("--peer", action="append", metavar="NODE=HOST:PORT",
                     help="another node's sidecar (repeatable); on a cluster GpuNodes say where they are")
    net.add_argument("--nixl-backend", default="UCX", metavar="NAME", help="NIXL backend (default UCX)")
    net.add_argument("--ucx-tls", metavar="LIST",
                     help="UCX transports (default $UCX_TLS, else tcp,sm,self,cuda_copy,cuda_ipc; add rc,dc "
                          "or ib for RDMA NICs)")
    net.add_argument("--ucx-net-devices", metavar="LIST",
                     help="NICs UCX may use, several at once (e.g. mlx5_0:1,mlx5_1:1; default: all)")
    net.add_argument("--nics-per-transfer", type=_positive_int, metavar="N",
                     help="NICs one read stripes over at once (UCX_MAX_RNDV_RAILS; published for placement; "
                          "default 2)")
    net.add_argument("--network-bandwidth", type=_rate, metavar="BYTES/S",
                     help="this node's network bandwidth, shared by SLO like every link (e.g. 25Gb/s, "
                          "3GB/s; default 25Gb/s)")
    net.add_argument("--lend-from-host", action="store_true",
                     help="lend objects from pinned host memory (copied there first) instead of GPU "
                          "memory: for NICs without GPUDirect RDMA")


def _usage_error(message: str) -> NoReturn:
    print(f"faastube sidecar: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; exits 2 naming the flags, as argparse does."""
    for name in ("gpu_slab", "host_slab", "gpu_arena", "host_arena"):
        if getattr(args, name) < 1 << 20:
            _usage_error(f"--{name.replace('_', '-')} must be at least 1Mi")
    if args.gpu_pool_min > args.gpu_pool_max:
        _usage_error("--gpu-pool-min is larger than --gpu-pool-max")
    if args.memory_policy == "static":
        defaults = DEFAULT_MEMORY_POLICY
        for flag, given, default in (("--pool-floor", args.pool_floor, defaults.floor_bytes),
                                     ("--pool-cap-share", args.pool_cap_share, defaults.cap_share),
                                     ("--restore-ahead", args.restore_ahead, defaults.restore_ahead),
                                     ("--evict-wait", args.evict_wait, defaults.evict_wait_s)):
            if given != default:
                _usage_error(f"{flag} has no effect with --memory-policy static")
    if args.simulated_gpus is not None and args.backend != "host":
        _usage_error("--simulated-gpus needs --backend host (a real GPU is not simulated)")
    for flag, name in (("--simulated-gpu-memory", "simulated_gpu_memory"),
                       ("--simulated-gpu-busy", "simulated_gpu_busy")):
        if getattr(args, name) is not None and not args.simulated_gpus:
            _usage_error(f"{flag} has no effect without --simulated-gpus")
    if (args.simulated_gpu_busy or 0) > (args.simulated_gpu_memory or DEFAULT_SIMULATED_GPU_BYTES):
        _usage_error("--simulated-gpu-busy is more than a simulated GPU's memory")
    for kind in ("gpu", "host"):
        quota = getattr(args, f"{kind}_quota")
        if quota is not None and not 1 << 20 <= quota <= getattr(args, f"{kind}_pool_max"):
            _usage_error(f"--{kind}-quota must be between 1Mi and --{kind}-pool-max")
    topology_user = args.device_plugin or args.publish_node
    cdi_exposure = args.gpu_exposure in ("cdi", "cdi-annotations")
    needs = [
        ("--kubelet-dir", args.kubelet_dir is not None, args.device_plugin, "--device-plugin"),
        ("--gpu-exposure", args.gpu_exposure is not None, args.device_plugin, "--device-plugin"),
        ("--socket-devices", args.socket_devices is not None, args.device_plugin, "--device-plugin"),
        ("--cdi-kind", args.cdi_kind is not None, cdi_exposure, "--gpu-exposure cdi or cdi-annotations"),
        ("--cdi-device-name", args.cdi_device_name is not None, cdi_exposure,
         "--gpu-exposure cdi or cdi-annotations"),
        ("--cdi-spec-dir", args.cdi_spec_dir is not None, cdi_exposure,
         "--gpu-exposure cdi or cdi-annotations"),
        ("--heartbeat", args.heartbeat is not None, args.publish_node, "--publish-node"),
        ("--sharing-slots", args.sharing_slots is not None, topology_user,
         "--device-plugin or --publish-node"),
        ("--simulated-topology", args.simulated_topology is not None, topology_user,
         "--device-plugin or --publish-node"),
        ("--kubeconfig", args.kubeconfig is not None,
         args.publish_node or args.identity == "kubernetes", "--publish-node or --identity kubernetes"),
        ("--proc-root", args.proc_root is not None, args.identity == "kubernetes",
         "--identity kubernetes"),
    ]
    for flag, given, enabled, requirement in needs:
        if given and not enabled:
            _usage_error(f"{flag} has no effect without {requirement}")
    if not args.node_name:
        if args.publish_node:
            _usage_error("--publish-node needs --node-name (or $NODE_NAME): "
                         "the GpuNode is named after the Kubernetes node")
        if args.identity == "kubernetes":
            _usage_error("--identity kubernetes needs --node-name (or $NODE_NAME): "
                         "only pods of this node may connect")
    _check_network_flags(args)
    if args.heartbeat is not None and args.heartbeat < 0.1:
        _usage_error(f"--heartbeat must be at least 100ms, got {args.heartbeat:g}s")
    if args.simulated_topology is not None:
        from faastube_spec import topology

        names = topology.builtin_names()
        if args.simulated_topology not in names:
            _usage_error(f"--simulated-topology: unknown topology {args.simulated_topology!r} "
                         f"(known: {', '.join(names)})")
    if args.kubeconfig is not None and not os.path.isfile(args.kubeconfig):
        _usage_error(f"--kubeconfig: no such file {args.kubeconfig!r}")
    if args.proc_root is not None and not os.path.isdir(args.proc_root):
        _usage_error(f"--proc-root: no such directory {args.proc_root!r}")


def _check_network_flags(args: argparse.Namespace) -> None:
    if args.peer_port is None:
        for flag, given in (("--peer-host", args.peer_host), ("--peer-secret-file", args.peer_secret_file),
                            ("--advertise-address", args.advertise_address), ("--peer", args.peer),
                            ("--ucx-tls", args.ucx_tls), ("--ucx-net-devices", args.ucx_net_devices),
                            ("--network-bandwidth", args.network_bandwidth),
                            ("--nics-per-transfer", args.nics_per_transfer),
                            ("--lend-from-host", args.lend_from_host),
                            ("--nixl-backend", args.nixl_backend != "UCX")):
            if given:
                _usage_error(f"{flag} has no effect without --peer-port")
        return
    if not args.node_name:
        _usage_error("--peer-port needs --node-name (or $NODE_NAME): refs name the node whose sidecar holds them")
    if not args.peer_secret_file:
        _usage_error("--peer-port needs --peer-secret-file: sidecars serve reads only to peers that know it")
    try:
        protocol.check_node(args.node_name)
        for text in args.peer or ():
            peer = parse_peer_flag(text)
            if peer.node == args.node_name:
                _usage_error(f"--peer {text}: that is this node")
    except errors.InvalidRequest as e:
        _usage_error(str(e))


def _network_settings(args: argparse.Namespace):  # -> NetworkSettings | None
    if args.peer_port is None:
        return None
    from faastube_sidecar.network.pieces import DEFAULT_NETWORK_BANDWIDTH, NetworkSettings

    return NetworkSettings(
        node=args.node_name, port=args.peer_port, secret_file=Path(args.peer_secret_file),
        host=args.peer_host or "0.0.0.0", advertise_address=args.advertise_address or os.environ.get("POD_IP"),
        peers=tuple(parse_peer_flag(t) for t in args.peer or ()), backend=args.nixl_backend, ucx_tls=args.ucx_tls,
        ucx_net_devices=args.ucx_net_devices,
        bandwidth_bytes_per_s=args.network_bandwidth or DEFAULT_NETWORK_BANDWIDTH,
        lend_from_host=args.lend_from_host,
        **({"nics_per_transfer": args.nics_per_transfer} if args.nics_per_transfer else {}))


def settings_from(args: argparse.Namespace):  # -> SidecarSettings (import deferred: prometheus)
    from faastube_sidecar.app import SidecarSettings
    from faastube_sidecar.kube import (
        DEFAULT_CDI_KIND,
        DEFAULT_CDI_SPEC_DIRS,
        DEFAULT_HEARTBEAT_S,
        DEFAULT_KUBELET_DIR,
        KubeSettings,
    )

    check_flags(args)
    kube = KubeSettings(
        device_plugin=args.device_plugin, kubelet_dir=args.kubelet_dir or DEFAULT_KUBELET_DIR,
        sharing_slots=args.sharing_slots, gpu_exposure=args.gpu_exposure or "envvar",
        cdi_kind=args.cdi_kind or DEFAULT_CDI_KIND, cdi_device_name=args.cdi_device_name or "uuid",
        cdi_spec_dirs=tuple(args.cdi_spec_dir or DEFAULT_CDI_SPEC_DIRS),
        socket_devices=args.socket_devices or 0, publish_node=args.publish_node,
        heartbeat_s=args.heartbeat if args.heartbeat is not None else DEFAULT_HEARTBEAT_S,
        simulated_topology=args.simulated_topology, kubeconfig=args.kubeconfig,
        proc_root=args.proc_root or "/proc")
    return SidecarSettings(
        socket_path=Path(args.socket), backend=args.backend, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        gpu_limits=PoolLimits(args.gpu_slab, args.gpu_pool_max, args.gpu_pool_min, args.idle_release,
                              arena_bytes=args.gpu_arena, quota_bytes=args.gpu_quota or args.gpu_pool_max // 2),
        host_limits=PoolLimits(args.host_slab, args.host_pool_max, 0, args.idle_release,
                               arena_bytes=args.host_arena, quota_bytes=args.host_quota or args.host_pool_max // 2),
        default_ttl_s=args.default_ttl, max_clients=args.max_clients, max_body_bytes=args.max_frame,
        socket_mode=args.socket_mode, socket_group=args.socket_group, hello_timeout_s=args.hello_timeout,
        identity=args.identity, node_name=args.node_name, kube=kube,
        copy_events=not args.no_copy_events, multipath=not args.no_multipath,
        memory=MemoryPolicy(name=args.memory_policy, floor_bytes=args.pool_floor, cap_share=args.pool_cap_share,
                            evict_wait_s=args.evict_wait, restore_ahead=args.restore_ahead),
        simulated_gpus=args.simulated_gpus or 0,
        simulated_gpu_bytes=args.simulated_gpu_memory or DEFAULT_SIMULATED_GPU_BYTES,
        simulated_gpu_busy_bytes=args.simulated_gpu_busy or 0,
        network=_network_settings(args))


def run(args: argparse.Namespace) -> int:
    from faastube_sidecar import app

    settings = settings_from(args)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.loop, args.spin_us)) as runner:
            runner.run(app.serve(settings))
    except errors.FaastubeError as e:
        raise SystemExit(f"faastube sidecar: {e}") from None
    return 0


def _loop_factory(choice: str, spin_us: float):  # -> Callable[[], AbstractEventLoop] | None
    if not 0 <= spin_us <= 10_000:
        raise SystemExit("faastube sidecar: --spin-us must be in 0..10000")
    if spin_us:
        if choice == "uvloop":
            raise SystemExit("faastube sidecar: --spin-us needs the asyncio loop (uvloop can't spin)")
        from faastube_sidecar.spinloop import spinning_loop_factory

        return spinning_loop_factory(spin_us)
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("faastube sidecar: --loop uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop
