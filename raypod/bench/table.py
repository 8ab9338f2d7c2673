"""What every benchmark suite reports with: figures, tables and result files.

The suites differ in what they measure, not in how they show it: a cell is
:func:`fmt` of a figure, a summary is :func:`median` and :func:`ratio` of per-trial
figures, a table is printed with :func:`print_table` (rich, else Markdown) and
written with :func:`markdown_table`, and the results land in ``<out>/<suite>.json``
and ``<suite>.md`` through :func:`write_results`. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

DASH = "—"
"""A figure that is missing (a failed trial, no recovery)."""


def labels(**anchors: str) -> dict[str, str]:
    """A suite's ``system -> label``: raypod first, then its anchors (``SYSTEMS`` is its keys)."""
    return {"raypod": "raypod", **anchors}


def fmt(x: Any, spec: str | None = None) -> str:
    """A table cell: ``—`` for None, ``format(x, spec)`` when given, else ``:g`` for a float."""
    if x is None:
        return DASH
    if spec is not None:
        return format(x, spec)
    return f"{x:g}" if isinstance(x, float) else str(x)


def median(xs: Iterable[float], digits: int = 3) -> float | None:
    """The median of ``xs`` rounded to ``digits`` (None when there is none)."""
    xs = list(xs)
    return round(statistics.median(xs), digits) if xs else None


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """``a / b`` rounded (None when either is missing or ``b`` is 0)."""
    return round(a / b, digits) if a is not None and b else None


def ratios_vs(medians: Mapping[str, float | None], base: str,
              systems: Iterable[str]) -> dict[str, float | None]:
    """``base``'s figure over each other system's, keyed ``"<base>/<system>"``."""
    return {f"{base}/{s}": ratio(medians.get(base), medians.get(s)) for s in systems if s != base}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is its second line (default: left first column, the rest right)."""
    align = align or "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
    lines = ["| " + " | ".join(header) + " |", align]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                right: Callable[[int], bool], width: int | None = 160, align: str | None = None) -> None:
    """Print the table with rich (``**bold**`` marks dropped); Markdown when rich is missing.

    Args:
        right: whether column ``k`` is right-justified.
        width: the console width (None: the terminal's).
    """
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(markdown_table(header, rows, align))
        return
    table = Table(title=title)
    for k, h in enumerate(header):
        table.add_column(h, justify="right" if right(k) else "left")
    for r in rows:
        table.add_row(*[c.replace("**", "") for c in r])
    Console(width=width).print(table)


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def module_versions(*names: str) -> dict[str, str]:
    """``name -> __version__`` of each module, in the order given."""
    return {n: importlib.import_module(n).__version__ for n in names}


def versions() -> dict[str, str]:
    """Python, torch and Ray versions: what a suite's machine record names."""
    return {"python": platform.python_version(), **module_versions("torch", "ray")}


def machine(load_before: Sequence[float], **extra: Any) -> dict[str, Any]:
    """The machine record of a suite's result: platform, CPUs, versions, load before and after."""
    return {"platform": platform.platform(), "nproc": os.cpu_count(), **versions(),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": loadavg(), **extra}


def machine_line(date: str, m: Mapping[str, Any]) -> str:
    """``Date: .... Machine: <platform>, <n> CPUs, Python ..., torch ..., Ray ...`` (no end)."""
    return (f"Date: {date}. Machine: {m['platform']}, {m['nproc']} CPUs, Python {m['python']}, "
            f"torch {m['torch']}, Ray {m['ray']}")


def commands_md(labels: Mapping[str, str], commands: Mapping[str, str]) -> list[str]:
    """The ``Commands:`` section of a results page: one bullet per system."""
    return ["Commands:", "", *[f"- {labels[s]}: `{c}`" for s, c in commands.items()], ""]


def problems_md(title: str, lines: Sequence[str]) -> list[str]:
    """A titled bullet list of what went wrong (nothing when nothing did)."""
    return [title, "", *[f"- {x}" for x in lines], ""] if lines else []


def write_results(result: Mapping[str, Any], out: str | os.PathLike | None, suite: str, md: str,
                  log: Callable[[str], None] | None = None, default: Callable[[Any], Any] | None = None,
                  newline: bool = True) -> None:
    """Write ``<out>/<suite>.json`` and ``<out>/<suite>.md`` (nothing when ``out`` is None)."""
    if out is None:
        return
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{suite}.json").write_text(json.dumps(result, indent=2, default=default)
                                           + ("\n" if newline else ""))
    (out_dir / f"{suite}.md").write_text(md)
    if log is not None:
        log(f"wrote {out_dir / (suite + '.json')} and {out_dir / (suite + '.md')}")
