"""Failures, recoveries and resizes of a job as ``raypod.event.<N>.*`` run tags.

Each event has an id (``<driver id>-<n>`` for failures, ``<driver id>-r<step>`` for
resizes) and fields that arrive over time (a failure first, its recovery later). Only
fields not sent yet are sent; an event gets its number N the first time it is sent, N
continuing the numbers the run already holds, so a restarted driver and the next
submission of a job add to the run's events rather than overwrite them. A step whose
``world_size`` differs from the step before is a resize. The MLflow callback's thread
owns the :class:`EventLog`.
"""

from __future__ import annotations

import re
from typing import Any

_EVENT_TAG_RE = re.compile(r"^raypod\.event\.(\d+)\.(\w+)$")
EVENT_COLUMNS = ("kind", "step", "rank", "detected_s", "resumed_s", "lost_steps",
                 "world_size_before", "world_size_after", "restored_from", "cause", "message")
"""The events table's columns after ``event`` (its N) and ``id``."""


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


class EventLog:
    """Every event this driver knows (sent or not), which fields are unsent, and their Ns.

    Args:
        uid: This driver's id, the prefix of the resize events' ids.
    """

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.events: dict[str, dict[str, Any]] = {}  # event id -> fields, in order
        self.dirty: dict[str, set[str]] = {}  # event id -> fields not sent yet
        self._index: dict[str, int] = {}  # event id -> N of its raypod.event.N.* tags
        self._next_index = 0
        self._counts = {"failures": 0, "resizes": 0}
        self._last_ws: float | None = None
        self._prior_ws: float | None = None
        self._first_ws: tuple[int, float, float] | None = None

    def merge(self, event_id: str, fields: dict[str, Any], dirty: bool) -> None:
        """Add fields to an event; ``dirty`` ones are to be sent."""
        self.events.setdefault(event_id, {}).update(fields)
        if dirty:
            self.dirty.setdefault(event_id, set()).update(fields)

    def check_resize(self, step: int, ws: float, time_s: float) -> None:
        """A step whose world size differs from the last one is a resize event."""
        before = self._last_ws
        self._last_ws = ws
        if before is None:
            self._first_ws = (step, ws, time_s)
            if self._prior_ws is None:
                return
            before, cause = self._prior_ws, "resubmission"
        elif ws == before:
            return
        else:
            unresolved = any(e.get("kind") != "resize" and e.get("resumed_s") is None
                             for e in self.events.values())
            cause = "failure" if unresolved else "scaling"
        self.merge(f"{self.uid}-r{step}", {
            "kind": "resize", "step": step, "detected_s": round(time_s, 3),
            "world_size_before": int(before), "world_size_after": int(ws), "cause": cause,
        }, dirty=True)

    def continue_world_size(self, ws: float | None) -> None:
        """The continued run's last ``world_size``: a different first one here is a resize."""
        if ws is None or self._prior_ws is not None:
            return
        self._prior_ws = float(ws)
        if self._first_ws is not None and self._first_ws[1] != self._prior_ws:
            step, first, time_s = self._first_ws  # steps came before the run was set up
            last, self._last_ws = self._last_ws, None
            self.check_resize(step, first, time_s)
            self._last_ws = last

    def index_prior(self, tags: dict[str, str]) -> None:
        """Continue the run's ``raypod.event.N`` numbering; reuse N for events sent before."""
        kinds: dict[int, str] = {}
        for key, value in tags.items():
            m = _EVENT_TAG_RE.match(key)
            if m is None:
                continue
            n = int(m.group(1))
            self._next_index = max(self._next_index, n + 1)
            if m.group(2) == "id":
                self._index[value] = n
            elif m.group(2) == "kind":
                kinds[n] = value
        self._counts["resizes"] = sum(1 for k in kinds.values() if k == "resize")
        self._counts["failures"] = len(kinds) - self._counts["resizes"]

    def forget_index(self) -> None:
        """The run is set up again from scratch: every event is to be numbered and sent anew."""
        self._index.clear()
        self._next_index = 0
        self.dirty = {eid: set(fields) for eid, fields in self.events.items()}

    def unsent_tags(self) -> dict[str, str]:
        """``raypod.event.<N>.<field>`` for every unsent field (numbering new events), and the counts.

        The caller clears :attr:`dirty` once the tags are in the store.
        """
        tags: dict[str, str] = {}
        for eid, fields in self.dirty.items():
            ev = self.events[eid]
            n = self._index.get(eid)
            if n is None:
                n = self._index[eid] = self._next_index
                self._next_index += 1
                self._counts["resizes" if ev.get("kind") == "resize" else "failures"] += 1
                fields = set(ev)  # a new index: send every field
                tags[f"raypod.event.{n}.id"] = eid
            for f in fields:
                if ev.get(f) is not None:
                    tags[f"raypod.event.{n}.{f}"] = _fmt(ev[f])
        tags["raypod.failures"] = str(self._counts["failures"])
        tags["raypod.resizes"] = str(self._counts["resizes"])
        return tags

    def spool_records(self) -> list[dict[str, Any]]:
        """The unsent fields as spool records (``{"e": {...}}``)."""
        records: list[dict[str, Any]] = []
        for eid, fields in self.dirty.items():
            ev = self.events.get(eid, {})
            records.append({"e": {"id": eid, "kind": ev.get("kind"),
                                  **{f: ev.get(f) for f in fields}}})
        return records

    def merge_spooled(self, records: list[dict[str, Any]], dirty: bool) -> None:
        """Take the events of spool records (``dirty``: to be sent from here)."""
        for rec in records:
            ev = rec.get("e")
            if isinstance(ev, dict) and ev.get("id"):
                self.merge(str(ev["id"]), {k: v for k, v in ev.items() if k != "id"}, dirty=dirty)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per event (``id`` and its fields), for ``events.json`` and the plot."""
        return [{"id": eid, **ev} for eid, ev in self.events.items()]

    def table(self) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
        """The events table's rows, and the same as columns (for ``log_table``)."""
        rows = [{"event": self._index.get(eid), "id": eid,
                 **{c: ev.get(c) for c in EVENT_COLUMNS}} for eid, ev in self.events.items()]
        data = {col: [r.get(col) for r in rows] for col in ("event", "id", *EVENT_COLUMNS)}
        return rows, data
