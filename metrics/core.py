"""What the VMM's and the daemon's collectors share: a histogram's state
that can be saved and summed, and prometheus-client metric families built
from a table of names."""

from __future__ import annotations


class Histogram:
    """A histogram's state: observations per bucket (not cumulative), sum and count."""

    def __init__(self, bounds, counts=None, total: float = 0.0):
        self.bounds = tuple(bounds)
        self.counts = list(counts) if counts is not None else [0] * (len(self.bounds) + 1)
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError("bucket counts do not match the bounds")
        self.total = float(total)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value

    def observe_beyond(self, at_least: float) -> None:
        """An observation past the last bound, known only to be at least
        ``at_least``: counted in +Inf, ``at_least`` in the sum (a lower bound)."""
        self.counts[-1] += 1
        self.total += at_least

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs ending with +Inf, as Prometheus wants them."""
        out, running = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out

    def to_dict(self) -> dict:
        return {"counts": self.counts, "sum": self.total}

    @classmethod
    def from_dict(cls, bounds, d: dict | None) -> Histogram:
        return cls(bounds) if d is None else cls(bounds, d["counts"], d["sum"])


def family(table: dict, name: str, labels=()):
    """The prometheus-client family for ``table[name]`` (type, help).
    Counters are declared without ``_total``, which the client appends."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    kind, doc = table[name]
    cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[kind]
    return cls(name.removesuffix("_total") if kind == "counter" else name, doc, labels=list(labels))


def registry_for(*collectors):
    """A registry of its own (not the client's global one, which would add
    this process's Python and GC series to every VM's endpoint)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return registry
