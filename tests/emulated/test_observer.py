"""The bus observer's record of a watched word (the guest's heartbeat): what
it keeps of each sample, and what it answers from it -- the changes
(`observe`, `timeline`), the pace per bin (`timeline`) and the points a
guest's outage is measured from (`heartbeat`)."""

import collections
import struct
import types

import pytest

from luvmm.liveupdate.emu import observer as obs
from luvmm.vmm import pace

BDF, IOVA = "0000:6a:01.0", 0x8048


class Word:
    """A device's IOMMU domain holding one u64 the guest writes."""

    def __init__(self):
        self.value = 0

    def read(self, iova: int, size: int) -> bytes:
        assert (iova, size) == (IOVA, 8)
        return struct.pack("<Q", self.value)


def watched():
    word = Word()
    dev = types.SimpleNamespace(domain=word, completion_times=collections.deque(),
                                completion_bytes=collections.deque())
    o = obs.Observer(types.SimpleNamespace(devices={BDF: dev}))
    o.watch(BDF, IOVA, owner="vmm")
    return o, word


def run(o, word, values, *, start=100.0, step=0.001):
    """One sample per value, ``step`` apart; returns the time of the last."""
    t = start
    for i, v in enumerate(values):
        t = round(start + i * step, 6)
        word.value = v
        o.sample(t)
    return t


def test_a_moving_word_costs_a_point_per_sample_and_a_standstill_two():
    o, word = watched()
    # 10 ms moving, 40 ms standing still, 10 ms moving again.
    values = list(range(0, 100, 10)) + [100] * 40 + list(range(110, 210, 10))
    run(o, word, values)
    points = list(o.watches[(BDF, IOVA)])
    assert len(points) == 10 + 2 + 10  # the standstill: where it began, and its last sample
    assert points[10] == (100.010, 100) and points[11] == (100.049, 100) and points[12] == (100.050, 110)
    # Its pace shows it: flat while it stood still, at pace around it.
    series = pace.pace_series(points, 100.0, 100.06, 0.01)
    assert series[:5] == pytest.approx([10_000, 0, 0, 0, 1000])  # 10 more by the first sample that moved


def test_a_word_standing_still_now_answers_its_last_sample():
    o, word = watched()
    last = run(o, word, [1, 2, 3] + [3] * 30)
    points = o.heartbeat(BDF, 99.0, 101.0, IOVA)
    assert points[-1] == [last, 3] and points[-2] == [100.002, 3]  # not the time it last moved
    assert len(o.watches[(BDF, IOVA)]) == 3  # kept once it moves again


def test_observe_and_timeline_count_changes_as_before():
    o, word = watched()
    run(o, word, [0] * 5 + list(range(1, 21)) + [20] * 30 + list(range(21, 26)))
    t0 = 99.9995  # bins' edges between samples
    seen = o.observe(BDF, t0, t0 + 0.0599, IOVA)
    # The first sample is a change (from nothing); the standstill's last sample is not.
    assert seen["heartbeat_changes"] == 1 + 20 + 5
    assert seen["heartbeat_max_gap_s"] == pytest.approx(0.031)
    timeline = o.timeline(BDF, t0, t0 + 0.0599, 0.01, IOVA)
    assert timeline["heartbeat_changes"] == [6, 10, 5, 0, 0, 5]
    assert "heartbeat_changes" not in o.timeline(BDF, t0, t0 + 0.0599, 0.01)  # the word not asked for


def test_timeline_gives_the_pace_per_bin_as_vmm_pace_does():
    o, word = watched()
    values = [i * 3 for i in range(50)] + [147] * 50 + [147 + i for i in range(1, 51)]
    last = run(o, word, values)
    timeline = o.timeline(BDF, 99.98, 100.2, 0.01, IOVA)
    points = o.heartbeat(BDF, 99.0, 101.0, IOVA)
    expected = pace.pace_series(points, 99.98, 99.98 + 22 * 0.01, 0.01)
    assert len(timeline["heartbeat_pace_hz"]) == len(timeline["bytes"]) == 22
    assert timeline["heartbeat_pace_hz"][:2] == [None, None]  # before the first sample: unknown
    for got, want in zip(timeline["heartbeat_pace_hz"][2:], expected[2:]):
        assert (got is None) == (want is None) and (got is None or got == pytest.approx(want, abs=0.1))
    assert timeline["heartbeat_pace_hz"][3] == pytest.approx(3000, abs=0.1)
    assert timeline["heartbeat_pace_hz"][8] == 0  # standing still
    assert timeline["heartbeat_pace_hz"][14] == pytest.approx(1000, abs=0.1)
    assert timeline["heartbeat_pace_hz"][-1] is None and last < 100.2  # past the last sample


def test_the_outage_from_the_observers_points_is_the_outage_from_every_sample():
    """The observer keeps fewer points than it samples: a guest's outage
    read from them is the one every sample would give."""
    stopped, resumed = 100.5, 100.55

    def beat(t):
        if t < stopped:
            return int((t - 100.0) * 1000)
        if t < resumed + 0.1:  # paused, then standing still 100 ms after the resume
            return 500
        return 500 + int((t - resumed - 0.1) * 1000)

    o, word = watched()
    times = [round(100.0 + i * 0.001, 6) for i in range(1200)]
    every = [(t, beat(t)) for t in times]
    for t, v in every:
        word.value = v
        o.sample(t)
    kept = [tuple(p) for p in o.heartbeat(BDF, 99.0, 102.0, IOVA)]
    assert len(kept) < len(every)
    want = pace.outage(every, stopped, resumed, at_pause=500)
    assert pace.outage(kept, stopped, resumed, at_pause=500) == want
    assert want["guest_lost_s"] == pytest.approx(0.1, abs=0.002)


def test_heartbeat_windows_are_bounded_and_a_word_not_watched_is_enoent():
    o, word = watched()
    run(o, word, range(10))
    with pytest.raises(ValueError, match="at most 30 s"):
        o.heartbeat(BDF, 0.0, obs.MAX_HEARTBEAT_WINDOW_S + 1, IOVA)
    with pytest.raises(ValueError):
        o.heartbeat(BDF, 2.0, 1.0, IOVA)
    with pytest.raises(FileNotFoundError):
        o.heartbeat(BDF, 99.0, 101.0, IOVA + 8)
    with pytest.raises(FileNotFoundError):
        o.heartbeat("0000:00:00.0", 99.0, 101.0, IOVA)
    assert o.watches[(BDF, IOVA)].maxlen == obs.MAX_POINTS  # memory: bounded as before
