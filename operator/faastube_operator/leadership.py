"""Which replica acts: kopf's peering, read the way kopf reads it.

kopf pauses its own handlers while a live peer of higher or equal priority is listed
in the ClusterKopfPeering object; the operator's sweep (``housekeeping``) runs outside
kopf's handlers, so it asks the same question of the same object before it writes.
Ties pause everyone in kopf, and so here: each replica takes a random priority, so
that ties do not happen in practice.

Kept pure apart from ``new_identity``/``new_priority``: tests give it a peering
object's status and a time.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from collections.abc import Mapping
from typing import Any

PEERING_KIND = "ClusterKopfPeering"
PEERING_API_VERSION = "kopf.dev/v1"
# kopf's default lifetime of a peer's keep-alive, when a peer does not say.
DEFAULT_LIFETIME_S = 60


def new_identity() -> str:
    """This process among its peers: the pod name (the host name in a pod) and pid.

    A restarted container keeps its identity, so its new keep-alive replaces the dead
    one's entry instead of waiting for it to expire.
    """
    return f"{socket.gethostname()}/{os.getpid()}"


def new_priority() -> int:
    """A random priority, so that two replicas never tie (ties pause both in kopf)."""
    return random.SystemRandom().randint(1, 2**31 - 1)


def _parse_time(text: Any) -> datetime.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def is_active(peering_status: Mapping[str, Any] | None, *, identity: str, priority: int,
              now: datetime.datetime) -> bool:
    """Whether this replica is the one that acts: no other live peer ranks as high.

    ``peering_status`` is the ClusterKopfPeering's ``status``: identity ->
    ``{priority, lifetime, lastseen}``, as kopf's keep-alives write it. A peer whose
    ``lastseen + lifetime`` has passed is dead; one without a readable time counts as
    alive (kopf treats a missing ``lastseen`` as "now").
    """
    for peer, info in (peering_status or {}).items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            their_priority = int(info.get("priority", 0))
            lifetime_s = int(info.get("lifetime", DEFAULT_LIFETIME_S))
        except (TypeError, ValueError):
            continue
        lastseen = _parse_time(info.get("lastseen")) or now
        if lastseen + datetime.timedelta(seconds=lifetime_s) <= now:
            continue  # dead: its keep-alive stopped
        if their_priority >= priority:
            return False
    return True


def peering_object(name: str) -> dict[str, Any]:
    """The ClusterKopfPeering the replicas share (created if missing: kopf does not)."""
    return {"apiVersion": PEERING_API_VERSION, "kind": PEERING_KIND,
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "faastube"}}}
