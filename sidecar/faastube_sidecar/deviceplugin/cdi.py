"""CDI device names, and whether this node's CDI specs define the ones we hand out.

In the ``cdi`` exposures the plugin answers ``Allocate`` with a fully qualified CDI device
name (``nvidia.com/gpu=GPU-<uuid>``); the container runtime (containerd >= 1.7 with CDI on,
CRI-O) looks the name up in the spec files of its CDI directories and applies that
device's edits (device nodes, driver libraries, hooks). A name no spec defines fails the
container at creation ("unresolvable CDI devices"), long after the scheduler committed the
pod to the node. So the sidecar reads the same directories and reports a GPU whose CDI
device is missing as *unhealthy*, with the reason: the kubelet stops handing out its
slots and the operator (through the GpuNode) stops placing functions on it, until the
spec appears (specs under ``/var/run/cdi`` are regenerated at boot, possibly after the
sidecar started).

Only ``kind`` and ``devices[].name`` of a spec are read; the runtime owns the rest.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import yaml
from faastube.errors import InvalidRequest

from faastube_sidecar.gpuhealth import GpuHealth, GpuHealthSource

logger = logging.getLogger(__name__)

# containerd's and CRI-O's default CDI spec directories, in their order of precedence
# (a later directory overrides an earlier one).
DEFAULT_SPEC_DIRS: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")

# The CDI specification's name rules: vendor "nvidia.com", class "gpu", device "GPU-..." or "0".
_VENDOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_CLASS = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?$")
_DEVICE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?$")


def validate_kind(kind: str) -> str:
    """``kind`` if it is a valid CDI kind (``vendor/class``), else InvalidRequest."""
    vendor, slash, klass = kind.partition("/")
    if not slash or not _VENDOR.match(vendor) or not _CLASS.match(klass):
        raise InvalidRequest(f"CDI kind {kind!r} is not vendor/class (e.g. nvidia.com/gpu)")
    return kind


def qualified_name(kind: str, device: str) -> str:
    """``kind=device``, the name a runtime resolves (``nvidia.com/gpu=GPU-1234``)."""
    validate_kind(kind)
    if not _DEVICE.match(device):
        raise InvalidRequest(f"{device!r} is not a valid CDI device name")
    return f"{kind}={device}"


def defined_devices(spec_dirs: Iterable[str]) -> frozenset[str]:
    """Every qualified device name the spec files in ``spec_dirs`` define.

    A missing directory defines nothing; an unreadable or malformed file is skipped with a
    warning (it must not hide the devices of the other files), as the runtimes skip it.
    """
    names: set[str] = set()
    for directory in spec_dirs:
        try:
            entries = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            logger.warning("cannot list CDI spec directory %s: %s", directory, e)
            continue
        for entry in entries:
            if entry.endswith(SPEC_SUFFIXES):
                names.update(_spec_devices(os.path.join(directory, entry)))
    return frozenset(names)


def _spec_devices(path: str) -> set[str]:
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)  # JSON is YAML too
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        logger.warning("skipping CDI spec %s: %s", path, e)
        return set()
    kind = spec.get("kind") if isinstance(spec, dict) else None
    devices = spec.get("devices") if isinstance(spec, dict) else None
    if not isinstance(kind, str) or not isinstance(devices, list):
        logger.warning("skipping CDI spec %s: no kind or no devices list", path)
        return set()
    names = set()
    for device in devices:
        name = device.get("name") if isinstance(device, dict) else None
        if isinstance(name, str):
            names.add(f"{kind}={name}")
    return names


class CdiCheckedHealth:
    """A :class:`~faastube_sidecar.gpuhealth.GpuHealthSource` that also requires each GPU's
    CDI device to be defined: a GPU the runtime could not inject is of no use to a pod.

    ``devices`` maps each GPU's UUID to its qualified CDI name. The spec directories are
    re-read at every poll (a handful of small files, every few seconds), so a spec that
    appears later makes the GPU healthy again.
    """

    def __init__(self, inner: GpuHealthSource, *, devices: Mapping[str, str],
                 spec_dirs: Sequence[str] = DEFAULT_SPEC_DIRS) -> None:
        self._inner = inner
        self._devices = dict(devices)
        self._spec_dirs = tuple(spec_dirs)
        self._missing: frozenset[str] = frozenset()

    def poll(self, uuids: Sequence[str], *, timeout_s: float) -> Mapping[str, GpuHealth]:
        states = dict(self._inner.poll(uuids, timeout_s=timeout_s))
        defined = defined_devices(self._spec_dirs)
        missing = frozenset(u for u in uuids if self._devices.get(u) not in defined)
        self._log_change(missing)
        for uuid in missing:
            state = states.get(uuid, GpuHealth(uuid, True))
            if state.healthy:  # an NVML failure says more; keep it
                states[uuid] = replace(state, healthy=False, reason=(
                    f"CDI device {self._devices.get(uuid, '?')} is defined by no spec in "
                    f"{', '.join(self._spec_dirs)}"))
        return states

    def _log_change(self, missing: frozenset[str]) -> None:
        if missing == self._missing:
            return
        if missing:
            logger.error("CDI devices %s are defined by no spec in %s: their GPUs are reported "
                         "unhealthy until a spec defines them (docs/device-plugin.md)",
                         sorted(self._devices.get(u, u) for u in missing), list(self._spec_dirs))
        else:
            logger.info("every GPU's CDI device is defined in %s", list(self._spec_dirs))
        self._missing = missing

    def close(self) -> None:
        self._inner.close()
