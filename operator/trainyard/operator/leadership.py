"""Which replica is active: kopf's peering rule, read from the peering objects.

kopf keeps every replica alive in a KopfPeering object (`status: {identity: {priority,
lifetime, lastseen}}`) and pauses its own watches while another live peer has a higher
or equal priority. kopf offers no hook for the rest of an operator, so the runtime
reads the same objects and applies the same rule to its queue workers, child watches
and resync: a standby replica then makes no writes of its own at all (kopf's
keep-alive in the peering object is kopf's, and is the only one).

A peer is alive until `lastseen + lifetime`; a replica that stops gracefully writes
lifetime 0, so its standby takes over as soon as that write is seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from trainyard.operator.status import parse_time


@dataclass(frozen=True)
class Verdict:
    """Whether this replica is active, and when to look again without an event."""

    active: bool
    blocking: tuple[str, ...] = ()  # the live peers this replica defers to
    recheck_at: datetime | None = None  # when the first blocking peer expires


def judge(
    peerings: Iterable[Mapping[str, Any]], *, identity: str, priority: int, now: datetime
) -> Verdict:
    """kopf's rule over every peering object this replica takes part in.

    >>> from datetime import UTC, datetime
    >>> now = datetime(2026, 1, 1, tzinfo=UTC)
    >>> seen = "2026-01-01T00:00:00+00:00"
    >>> peering = {"status": {"a": {"priority": 5, "lifetime": 60, "lastseen": seen},
    ...                       "b": {"priority": 9, "lifetime": 60, "lastseen": seen}}}
    >>> judge([peering], identity="a", priority=5, now=now).active
    False
    >>> judge([peering], identity="b", priority=9, now=now).active
    True
    >>> judge([peering], identity="c", priority=99, now=now).active  # not announced yet
    False
    """
    blocking: list[str] = []
    expiries: list[datetime] = []
    peerings = list(peerings)
    if peerings and not any(identity in ((p or {}).get("status") or {}) for p in peerings):
        # kopf has not announced this replica yet: the others cannot see it, so it must not
        # act as if alone (two replicas starting together would both write for a moment).
        return Verdict(active=False, blocking=("(not announced yet)",))
    for peering in peerings:
        for peer, info in ((peering or {}).get("status") or {}).items():
            if peer == identity or not isinstance(info, Mapping):
                continue
            lastseen = parse_time(str(info.get("lastseen") or "")) or now
            expires = lastseen + timedelta(seconds=int(info.get("lifetime") or 0))
            if expires <= now:
                continue
            if int(info.get("priority") or 0) >= priority:
                blocking.append(peer)
                expiries.append(expires)
    return Verdict(
        active=not blocking,
        blocking=tuple(sorted(blocking)),
        recheck_at=min(expiries) if expiries else None,
    )
