"""``crdtswarm bench``: run the benchmarks of ``benchmarks/``, plot them, summarise them.

Each benchmark runs as ``python -m benchmarks.<name> [--quick]`` in the repository
root, its output going to ``<out>/<name>.log``. Its results are the JSON file it
writes in ``benchmarks/results/`` during the run or, failing that, the JSON lines
it prints; they are copied to ``<out>`` and plotted there (`crdtswarm.cli.plots`).
The benchmarks live in the repository, not in the installed package: without a
clone, the command says so in one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from crdtswarm.cli.app import CliError
from crdtswarm.cli.plots import (
    MissingMatplotlibError,
    plot_convergence,
    plot_directory_size,
    plot_route_stretch,
    plot_throughput,
    require_matplotlib,
    rows_of,
)
from crdtswarm.cli.terminal import is_live

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = ["BENCHMARKS", "BenchRun", "bench", "find_root", "register", "run_benchmark"]

BENCHMARKS: Final = ("convergence", "directory_size", "routing", "stream_throughput", "webrtc")
"""The benchmark modules of ``benchmarks/``, in the order ``crdtswarm bench`` runs them."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchRun:
    """One benchmark's run."""

    name: str
    returncode: int
    seconds: float
    log: Path
    """Its stdout and stderr."""
    document: dict[str, Any] | None
    """Its JSON results (``{"benchmark": ..., "results": [...]}``), None when it gave none."""
    json_path: Path | None
    """Where those results are in the output directory."""
    png_path: Path | None
    """A plot the benchmark drew itself (routing), copied to the output directory."""


def find_root(candidates: Iterable[Path]) -> Path | None:
    """The first of ``candidates`` holding the ``benchmarks`` package, or None."""
    for candidate in candidates:
        if (candidate / "benchmarks" / "__init__.py").is_file():
            return candidate
    return None


def _default_candidates() -> list[Path]:
    """The clone the package was installed from (editable install), then the cwd."""
    return [Path(__file__).resolve().parents[2], Path.cwd()]


def run_benchmark(root: Path, name: str, *, quick: bool, out: Path) -> BenchRun:
    """Run ``python -m benchmarks.<name>`` in ``root``; collect its results into ``out``."""
    results = root / "benchmarks" / "results"
    log = out / f"{name}.log"
    command = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if quick else [])]
    started, start = time.time(), time.perf_counter()
    with log.open("w", encoding="utf-8") as output:
        returncode = subprocess.run(
            command, cwd=root, stdout=output, stderr=subprocess.STDOUT, check=False
        ).returncode
    seconds = time.perf_counter() - start
    document, source = _results(results, name, started, log if returncode == 0 else None)
    json_path = png_path = None
    if document is not None:
        stem = source.stem if source is not None else name
        json_path = out / f"{stem}.json"
        if source is None or source.resolve() != json_path.resolve():
            json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        png = source.with_suffix(".png") if source is not None else None
        if png is not None and png.is_file() and png.stat().st_mtime >= started:
            png_path = out / png.name
            if png.resolve() != png_path.resolve():
                shutil.copyfile(png, png_path)
    return BenchRun(
        name=name,
        returncode=returncode,
        seconds=seconds,
        log=log,
        document=document,
        json_path=json_path,
        png_path=png_path,
    )


def _results(
    results: Path, name: str, started: float, log: Path | None
) -> tuple[dict[str, Any] | None, Path | None]:
    """The JSON file the benchmark wrote since ``started`` (newest), else its JSON lines.

    Those are read from ``log``; None: not those of a run that failed half-way.
    """
    fresh = sorted(
        (p for p in results.glob(f"{name}*.json") if p.stat().st_mtime >= started),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in fresh:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and isinstance(document.get("results"), list):
            return document, path
    if log is None:
        return None, None
    rows = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    if not rows:
        return None, None
    return {"benchmark": name, "results": rows}, None


def _plot(runs: Sequence[BenchRun], out: Path) -> list[Path]:
    """Every plot the results allow; the routing plot is re-drawn or the benchmark's own."""
    documents = {run.name: run.document for run in runs if run.document is not None}
    written = [
        plot_throughput(documents, out / "throughput.png"),
        plot_convergence(documents, out / "convergence_time.png"),
        plot_directory_size(documents, out / "directory_size.png"),
    ]
    stretch = plot_route_stretch(documents, out / "route_stretch.png")
    if stretch is None:  # benchmarks.routing draws its stretch CDFs itself
        stretch = next((run.png_path for run in runs if run.name == "routing"), None)
    written.append(stretch)
    return [path for path in written if path is not None]


def _describe(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(measure, value, against the baseline) for the summary table, one per headline row.

    Rows with ``value`` and ``unit`` are shown as they are, with their qualifiers
    (``n``, ``mode``, ``clock``, ``mesh``, ...) and their first ``ratio*`` key; the
    routing and directory summaries are picked by name; other rows (time series)
    are left to the plots.
    """
    out: list[tuple[str, str, str]] = []
    for row in rows:
        name = str(row.get("name", "?"))
        qualifiers = " ".join(
            f"{k}={row[k]}" for k in ("n", "clock", "mode", "mesh", "baseline_for") if k in row
        )
        measure = f"{name} {qualifiers}".strip()
        value = row.get("value")
        if isinstance(value, int | float) and not isinstance(value, bool):
            ratio = next(
                (
                    f"{k.removeprefix('ratio_')}: {_short(row[k])}"
                    for k in row
                    if k.startswith("ratio")
                ),
                "",
            )
            out.append((measure, f"{value:,.4g} {row.get('unit', '')}".strip(), ratio))
        elif name == "routing_quality":
            stretch = (
                f"stretch median {row.get('stretch_vs_onehop_opt_median', '?')}, "
                f"p95 {row.get('stretch_vs_onehop_opt_p95', '?')}"
            )
            out.append((measure, stretch, "vs the one-relay optimum (targets 1.05, 1.2)"))
        elif name == "routing_traffic":
            probe = row.get("probe_bytes_per_node_per_s", "?")
            gossip = row.get("gossip_bytes_per_node_per_s", "?")
            out.append((measure, f"probes {probe} B/s, rows {gossip} B/s", "per node, flooded"))
        elif name == "routing_failover":
            took = f"median {row.get('median_s', '?')} s, p95 {row.get('p95_s', '?')} s"
            out.append((measure, took, "until routes avoid a dead relay"))
        elif name == "directory_growth":
            size = f"{row.get('final_size_bytes', '?')} B at the end"
            out.append((measure, size, f"baseline {row.get('baseline_final_size_bytes', '?')} B"))
    return out


def _short(value: object) -> str:
    """Numbers to 3 significant digits, anything else as it is."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def summary_table(runs: Sequence[BenchRun]) -> Table:
    """The headline figures of every run, and each run's status."""
    table = Table(title="crdtswarm benchmarks", box=box.SIMPLE_HEAVY)
    table.add_column("benchmark", style="bold")
    table.add_column("measure", overflow="fold")
    table.add_column("value", justify="right")
    table.add_column("against the baseline", overflow="fold")
    for run in runs:
        status = f"[dim]ran in {run.seconds:.1f} s[/dim]"
        if run.returncode != 0:
            status = f"[red]FAILED (exit {run.returncode}) after {run.seconds:.1f} s[/red]"
        table.add_row(run.name, status, "", "")
        for measure, value, ratio in _describe(rows_of(run.document)):
            table.add_row("", measure, value, ratio)
    return table


def _run_all(
    root: Path, names: Sequence[str], *, quick: bool, out: Path, console: Console
) -> list[BenchRun]:
    runs: list[BenchRun] = []
    if not is_live(console):
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name}: running", flush=True)
            run = run_benchmark(root, name, quick=quick, out=out)
            outcome = "done" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
            print(f"[{i}/{len(names)}] {name}: {outcome} in {run.seconds:.1f} s", flush=True)
            runs.append(run)
        return runs
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("benchmarks", total=len(names))
        for name in names:
            progress.update(task, description=f"benchmarks.{name}")
            run = run_benchmark(root, name, quick=quick, out=out)
            outcome = "done" if run.returncode == 0 else f"[red]FAILED (exit {run.returncode})[/]"
            progress.console.print(f"{name}: {outcome} in {run.seconds:.1f} s")
            runs.append(run)
            progress.advance(task)
    return runs


@click.command("bench", short_help="Run the benchmarks; plot and summarise them.")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option(
    "--quick",
    is_flag=True,
    help="Seconds-long smoke runs (each benchmark's own --quick): the figures are rough.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for the JSON results, logs and PNG plots (created if needed; "
    "default: benchmarks/results in the repository).",
)
def bench(names: tuple[str, ...], quick: bool, out: Path | None) -> None:
    """Run the benchmarks NAME... (default: all of them), plot and summarise their results.

    NAME is one of convergence, directory_size, routing, stream_throughput, webrtc.
    Needs a clone of the repository (the benchmarks are not installed with the
    package) and matplotlib (pip install 'crdtswarm[bench]'). A full run takes
    several minutes; --quick takes about half a minute for all five.
    """
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise CliError(
            f"unknown benchmark {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(BENCHMARKS)}"
        )
    chosen = list(dict.fromkeys(names)) or list(BENCHMARKS)
    root = find_root(_default_candidates())
    if root is None:
        raise CliError(
            "the benchmarks package is not available: run crdtswarm bench from a clone of "
            "the repository (with benchmarks/ next to crdtswarm/), installed with "
            "pip install -e '.[bench]'"
        )
    try:
        require_matplotlib()
    except MissingMatplotlibError as exc:
        raise CliError(str(exc)) from exc
    out = out if out is not None else root / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    runs = _run_all(root, chosen, quick=quick, out=out, console=console)
    plots = _plot(runs, out)
    console.print(summary_table(runs))
    for run in runs:
        results = f", results {run.json_path}" if run.json_path is not None else ""
        console.print(f"{run.name}: log {run.log}{results}", soft_wrap=True, highlight=False)
    for path in plots:
        console.print(f"plot: {path}", soft_wrap=True, highlight=False)
    failed = [run for run in runs if run.returncode != 0]
    if failed:
        raise CliError(
            "benchmark failed: "
            + ", ".join(f"{run.name} (exit {run.returncode}, see {run.log})" for run in failed)
        )


def register(group: click.Group) -> None:
    """Add ``bench`` to the command group."""
    group.add_command(bench)
