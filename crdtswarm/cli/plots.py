"""PNG plots of the benchmarks' JSON results, for ``crdtswarm bench`` (matplotlib).

Each function takes the parsed JSON documents of the benchmarks that ran (by
benchmark name: ``{"benchmark": ..., "results": [row, ...]}``), reads the rows it
knows defensively (a missing key skips that row, a missing benchmark skips the
plot) and returns the path it wrote, or None when there was nothing to plot.
matplotlib is imported inside the functions: it is an optional dependency (the
``bench`` extra), and `require_matplotlib` says so in one line.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "MissingMatplotlibError",
    "plot_convergence",
    "plot_directory_size",
    "plot_route_stretch",
    "plot_throughput",
    "require_matplotlib",
    "rows_of",
]


class MissingMatplotlibError(RuntimeError):
    """Raised by `require_matplotlib` when matplotlib cannot be imported."""


def require_matplotlib() -> None:
    """Import matplotlib (Agg backend) now, before any benchmark runs.

    Raises:
        MissingMatplotlibError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingMatplotlibError(
            "matplotlib is not installed: install the bench extra "
            "(pip install 'crdtswarm[bench]') to plot the benchmarks"
        ) from exc
    matplotlib.use("Agg")


def rows_of(document: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The result rows of a benchmark's JSON document (dicts only; [] when absent)."""
    if document is None:
        return []
    rows = document.get("results")
    if not isinstance(rows, list):
        return []
    return [row for row in rows if isinstance(row, dict)]


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, Axes]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput(documents: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Crdtswarm stream throughput next to its raw baseline (stream_throughput, webrtc).

    Pairs every ``crdtswarm_<x>`` row in MB/s with the ``raw_<x>`` row of the same
    benchmark, and draws them as grouped bars labelled with their ratio.
    """
    pairs: list[tuple[str, float, float]] = []
    for name in ("stream_throughput", "webrtc"):
        rows = {row.get("name"): row for row in rows_of(documents.get(name))}
        for key, row in rows.items():
            if not isinstance(key, str) or not key.startswith("crdtswarm_"):
                continue
            base = rows.get("raw_" + key.removeprefix("crdtswarm_"))
            ours, raw = _number(row, "value"), _number(base or {}, "value")
            if row.get("unit") == "MB/s" and ours is not None and raw is not None:
                pairs.append((key.removeprefix("crdtswarm_"), ours, raw))
    if not pairs:
        return None
    fig, ax = _figure(max(6.0, 1.6 * len(pairs) + 2), 4.5)
    xs = range(len(pairs))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [p[2] for p in pairs], width, label="raw baseline")
    ax.bar([x + width / 2 for x in xs], [p[1] for p in pairs], width, label="crdtswarm")
    for x, (_, ours, raw) in zip(xs, pairs, strict=True):
        ax.annotate(
            f"{ours / raw:.2f}x" if raw else "",
            (x + width / 2, ours),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), [p[0].replace("_", "\n", 1) for p in pairs], fontsize=8)
    ax.set_ylabel("MB/s")
    ax.set_yscale("log")
    ax.set_title("stream throughput: crdtswarm vs the raw transport (same run)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_convergence(documents: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Time for an edit to reach every replica against the swarm size N (convergence)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows_of(documents.get("convergence")):
        n, value = _number(row, "n"), _number(row, "value")
        if n is None or value is None:
            continue
        if row.get("name") == "convergence_time":
            series.setdefault("simulated clock", []).append((n, value))
            floor = _number(row, "floor_ms")
            if floor is not None:
                series.setdefault("latency floor", []).append((n, floor))
        elif row.get("name") == "convergence_time_wall":
            series.setdefault("wall clock (all nodes on one core)", []).append((n, value))
    if not series:
        return None
    fig, ax = _figure()
    for label, points in series.items():
        points.sort()
        style = "--" if label == "latency floor" else "-o"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    sizes = sorted({p[0] for points in series.values() for p in points})
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [f"{n:g}" for n in sizes])
    ax.set_xlabel("nodes (N)")
    ax.set_ylabel("median time until every replica has an edit (ms)")
    ax.set_title("convergence on the simulated network")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_route_stretch(documents: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """A CDF of route stretch, when the routing results carry per-pair stretch lists.

    `benchmarks.routing` draws this plot itself (its JSON holds only medians and
    percentiles): any row key starting with ``stretch`` whose value is a list of
    numbers is plotted; None when there is none (copy the benchmark's PNG instead).
    """
    curves: list[tuple[str, list[float]]] = []
    for row in rows_of(documents.get("routing")):
        for key, value in row.items():
            if key.startswith("stretch") and isinstance(value, list) and value:
                numbers = sorted(float(v) for v in value if isinstance(v, int | float))
                label = " ".join(str(row[k]) for k in ("mesh", "n") if k in row)
                curves.append((f"{label} {key}".strip(), numbers))
    if not curves:
        return None
    fig, ax = _figure()
    for label, values in curves:
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("stretch of the chosen route (RTT / optimum)")
    ax.set_ylabel("share of pairs")
    ax.set_title("route stretch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_directory_size(documents: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Size of the membership directory over simulated hours, with and without collection."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows_of(documents.get("directory_size")):
        hour, size = _number(row, "hour"), _number(row, "size_bytes")
        if row.get("name") != "directory_size" or hour is None or size is None:
            continue
        label = "with maintain()" if row.get("maintain") else "without (baseline)"
        series.setdefault(label, []).append((hour, size / 1000))
    if not series:
        return None
    fig, ax = _figure()
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", label=label)
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("directory document size (KB)")
    ax.set_title("membership directory under churn")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
