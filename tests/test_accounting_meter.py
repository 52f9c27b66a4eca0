"""The meter: segments per session and module add up exactly; open sessions,
interleaving, duplicates and engine restarts."""
from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.accounting.meter import Action, Meter, OpenSession, Segment, SessionEnd

S = 1_000_000_000


class Stream:
    """Builds records the way the ring writer stamps them."""

    def __init__(self, node: str = "n1") -> None:
        self.node = node
        self.seq = 0

    def _rec(self, **kw):
        self.seq += 1
        return {"seq": self.seq, "node": self.node, **kw}

    def start(self, sid, t, account="acc"):
        return self._rec(type="session", kind="start", session=sid, account=account,
                         mono_ns=t, wall_ns=t + 10**18, reason="")

    def end(self, sid, t, account="acc", reason="hangup"):
        return self._rec(type="session", kind="end", session=sid, account=account,
                         mono_ns=t, wall_ns=t + 10**18, reason=reason)

    def go(self, sid, frm, to, t, level="basic", account="acc"):
        return self._rec(type="transition", session=sid, account=account, **{"from": frm},
                         to=to, level=level, reason="r", mono_ns=t, wall_ns=t + 10**18)

    def act(self, sid, module, action, count, account="acc"):
        return self._rec(type="action", session=sid, account=account, module=module,
                         action=action, count=count)


def segments(events):
    return [e for e in events if isinstance(e, Segment)]


def test_one_call_three_modules():
    s = Stream()
    m = Meter()
    recs = [s.start("a", 100), s.go("a", "", "baton.menu", 100, "application"),
            s.go("a", "baton.menu", "baton.bridge", 100 + 20 * S),
            s.act("a", "baton.bridge", "message", 2),
            s.go("a", "baton.bridge", "baton.hold", 100 + 200 * S),
            s.end("a", 100 + 230 * S)]
    ev = m.feed_many(recs)
    segs = segments(ev)
    assert [(g.module, g.duration_ns, g.seq) for g in segs] == [
        ("baton.menu", 20 * S, 3), ("baton.bridge", 180 * S, 5), ("baton.hold", 30 * S, 6)]
    assert segs[0].level == "application" and segs[1].level == "basic"
    acts = [e for e in ev if isinstance(e, Action)]
    assert len(acts) == 1 and acts[0].count == 2 and acts[0].key == "n1:4"
    end = [e for e in ev if isinstance(e, SessionEnd)][0]
    assert end.duration_ns == end.metered_ns == 230 * S
    assert not m.sessions


def test_first_segment_starts_at_the_session_start():
    s, m = Stream(), Meter()
    ev = m.feed_many([s.start("a", 1000), s.go("a", "", "baton.hold", 1500), s.end("a", 5000)])
    assert [g.duration_ns for g in segments(ev)] == [4000]


def test_open_sessions_carry_over_and_close_later():
    s, m = Stream(), Meter()
    first = m.feed_many([s.start("a", 0), s.go("a", "", "x.y", 0), s.start("b", 5),
                         s.go("b", "", "x.z", 5)])
    assert segments(first) == []
    assert {k[1] for k in m.sessions} == {"a", "b"}
    # the state survives a dump/load round trip through msgpack
    m2 = Meter()
    m2.load([OpenSession.load(msgpack.unpackb(msgpack.packb(o.dump()))) for o in m],
            {n: list(v) for n, v in m.nodes.items()})
    ev = m2.feed_many([s.end("b", 50), s.end("a", 70)])
    assert sorted((g.session, g.duration_ns) for g in segments(ev)) == [("a", 70), ("b", 45)]


def test_duplicate_records_are_ignored():
    s, m = Stream(), Meter()
    recs = [s.start("a", 0), s.go("a", "", "x.y", 0), s.end("a", 10)]
    assert len(segments(m.feed_many(recs))) == 1
    assert m.feed_many(recs) == []
    assert m.skipped == 3


def test_backwards_timestamps_are_clamped():
    s, m = Stream(), Meter()
    ev = m.feed_many([s.start("a", 100), s.go("a", "", "x.y", 100), s.go("a", "x.y", "x.z", 90),
                      s.end("a", 80)])
    assert [g.duration_ns for g in segments(ev)] == [0, 0]


def test_stray_record_after_end_opens_nothing():
    s, m = Stream(), Meter()
    m.feed_many([s.start("a", 0), s.go("a", "", "x.y", 0), s.end("a", 10)])
    assert segments(m.feed_many([s.go("a", "x.y", "x.z", 20)])) == []
    assert not m.sessions


def test_close_stale_after_engine_restart():
    s, m = Stream(), Meter()
    m.feed_many([s.start("a", 0), s.go("a", "", "x.y", 0), s.start("b", 10),
                 s.go("b", "", "x.z", 10), s.go("b", "x.z", "x.w", 40), s.start("c", 70)])
    other = Stream("n2")
    m.feed_many([other.start("q", 0), other.go("q", "", "x.y", 0)])
    ev = m.close_stale("n1")
    segs = sorted((g.session, g.module, g.duration_ns, g.key) for g in segments(ev))
    # closed at the last moment node n1 was seen alive (mono 70)
    assert segs == [("a", "x.y", 70, "n1:stale:a"), ("b", "x.w", 30, "n1:stale:b")]
    assert {e.session for e in ev if isinstance(e, SessionEnd)} == {"a", "b", "c"}
    assert list(m.sessions) == [("n2", "q")]


def test_node_start_record_closes_stale_sessions():
    s, m = Stream(), Meter()
    m.feed_many([s.start("a", 0), s.go("a", "", "x.y", 0), s.go("a", "x.y", "x.z", 50)])
    ev = m.feed_many([s._rec(type="node", kind="start", mono_ns=5, wall_ns=5)])
    assert [(g.module, g.duration_ns) for g in segments(ev)] == [("x.z", 0)]


# -- property: segments add up exactly --------------------------------------------------

@st.composite
def streams(draw):
    """Interleaved sessions with random transitions, some never ended, as
    (records, {session: (start, end or None)})."""
    n = draw(st.integers(1, 8))
    plans = []
    for i in range(n):
        t = draw(st.integers(0, 10**12))
        steps = draw(st.lists(st.integers(0, 10**11), max_size=6))
        ended = draw(st.booleans()) or draw(st.booleans())
        with_start = draw(st.integers(0, 9)) > 0
        plans.append((f"s{i}", t, steps, ended, with_start))
    # Each session's own events in time order, then a random interleaving.
    queues = []
    for sid, t, steps, ended, with_start in plans:
        evs = []
        if with_start:
            evs.append(("start", sid, t))
        cur = t
        frm = ""
        for j, d in enumerate(steps):
            cur += d if j else draw(st.integers(0, 10**9))
            to = draw(st.sampled_from(["baton.bridge", "baton.menu", "acme.survey", "x.y"]))
            evs.append(("go", sid, cur, frm, to))
            frm = to
            if draw(st.booleans()):
                evs.append(("act", sid, to))
        if ended:
            cur += draw(st.integers(0, 10**11))
            evs.append(("end", sid, cur))
        queues.append(evs)
    order = []
    while any(queues):
        live = [q for q in queues if q]
        q = draw(st.sampled_from(live))
        order.append(q.pop(0))
    return plans, order


@settings(max_examples=200, deadline=None)
@given(streams(), st.integers(1, 5))
def test_ended_sessions_add_up_exactly(data, cut):
    plans, order = data
    s = Stream()
    recs = []
    starts, ends = {}, {}
    for e in order:
        if e[0] == "start":
            recs.append(s.start(e[1], e[2]))
            starts[e[1]] = e[2]
        elif e[0] == "go":
            recs.append(s.go(e[1], e[3], e[4], e[2]))
        elif e[0] == "act":
            recs.append(s.act(e[1], e[2], "api_call", 1))
        else:
            recs.append(s.end(e[1], e[2]))
            ends[e[1]] = e[2]
    # Feed in `cut` pieces, persisting and restoring the state in between,
    # as the accountant does between batches and restarts.
    m = Meter()
    events = []
    size = max(1, len(recs) // cut)
    for i in range(0, len(recs), size):
        events += m.feed_many(recs[i:i + size])
        state = [msgpack.packb(o.dump()) for o in m]
        nodes = {k: list(v) for k, v in m.nodes.items()}
        m = Meter()
        m.load([OpenSession.load(msgpack.unpackb(b)) for b in state], nodes)
    per_session: dict[str, int] = {}
    for g in segments(events):
        assert g.duration_ns >= 0
        per_session[g.session] = per_session.get(g.session, 0) + g.duration_ns
    firsts = {}
    for r in recs:
        if r["type"] == "transition":
            firsts.setdefault(r["session"], r["mono_ns"])
    for sid, end in ends.items():
        if sid not in firsts:
            assert per_session.get(sid, 0) == 0
            continue
        begin = starts.get(sid, firsts[sid])
        assert per_session[sid] == end - begin, sid
    # sessions not ended have segments up to their last transition only
    for sid in firsts:
        if sid not in ends:
            assert ("n1", sid) in m.sessions
    ends_ev = [e for e in events if isinstance(e, SessionEnd)]
    for e in ends_ev:
        if e.duration_ns is not None and e.session in firsts:
            assert e.metered_ns == e.duration_ns
