"""Set keys in a containers.conf (TOML) without disturbing the rest of the file.

Rootful podman on our build machines needs two settings its defaults get wrong there
(setrlimit and cgroup errors): container ulimits under ``[containers]`` and the runc
runtime under ``[engine]``. This edits the file line by line, so comments and every
other setting an administrator wrote stay as they were, and it is idempotent: a second
run changes nothing. The result is parsed with ``tomllib`` before it is written.

    python3 hack/containers_conf.py /etc/containers/containers.conf

Only the Python standard library: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import tomllib
from collections.abc import Mapping

# section -> key -> TOML value text
SETTINGS: dict[str, dict[str, str]] = {
    "containers": {"default_ulimits": '["nofile=20000:20000", "nproc=32768:32768"]'},
    "engine": {"runtime": '"runc"'},
}

_SECTION = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]\s*(#.*)?$")


def _key_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or "=" not in stripped:
        return None
    return stripped.split("=", 1)[0].strip()


def with_settings(text: str, settings: Mapping[str, Mapping[str, str]]) -> str:
    """``text`` with each ``section.key = value`` set, replacing an existing assignment.

    A multi-line value being replaced (an array spread over lines) is removed whole;
    a section that is missing is appended at the end.
    """
    lines = text.splitlines()
    out: list[str] = []
    section: str | None = None
    done: set[tuple[str, str]] = set()
    skipping = 0          # open brackets of a replaced multi-line value still to skip

    def flush_missing(name: str | None) -> None:
        if name is None or name not in settings:
            return
        for key, value in settings[name].items():
            if (name, key) not in done:
                out.append(f"{key} = {value}")
                done.add((name, key))

    for line in lines:
        if skipping:
            skipping += line.count("[") - line.count("]")
            continue
        match = _SECTION.match(line)
        if match:
            flush_missing(section)
            section = match.group(1)
            out.append(line)
            continue
        key = _key_of(line)
        if section is not None and key is not None and key in settings.get(section, {}):
            out.append(f"{key} = {settings[section][key]}")
            done.add((section, key))
            value = line.split("=", 1)[1]
            skipping = max(0, value.count("[") - value.count("]"))
            continue
        out.append(line)
    flush_missing(section)
    for name, keys in settings.items():
        missing = [key for key in keys if (name, key) not in done]
        if missing:
            if out and out[-1].strip():
                out.append("")
            out.append(f"[{name}]")
            flush_missing(name)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="/etc/containers/containers.conf")
    args = parser.parse_args(argv)
    try:
        with open(args.path, encoding="utf-8") as f:
            before = f.read()
    except FileNotFoundError:
        before = ""
    after = with_settings(before, SETTINGS)
    parsed = tomllib.loads(after)      # never write a file podman can't read
    for name, keys in SETTINGS.items():
        for key, value in keys.items():
            if parsed[name][key] != tomllib.loads(f"v = {value}")["v"]:
                raise SystemExit(f"{args.path}: [{name}] {key} did not take")
    if after == before:
        print(f"{args.path}: already set")
        return 0
    directory = os.path.dirname(os.path.abspath(args.path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".containers.conf.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(after)
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.path)
    print(f"{args.path}: updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
