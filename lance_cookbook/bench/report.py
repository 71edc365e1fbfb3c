"""The benchmark's report: ratios between loaders against the targets, the table on stdout, the bar chart."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .candidates import BOUNDS
from .measure import MiB

__all__ = ["format_table", "plot", "ratios_and_targets"]


NUMERATORS = (
    "lance_tv_uint8",
    "lance_tv_uint8_block",
    "lance_all_columns",
    "lance_arrow",
    "lance_pil_float32",
    "imagefolder_tv",
)
DENOMINATORS = ("imagefolder_pil", "imagefolder_tv", "bound_tv", "bound_pil", "hf_datasets")
# the formats users pick instead of Lance (lance_cookbook.bench.peers, run in the peer environment), and
# Lance's own iterable LanceDataset (opt-in)
PEERS = ("webdataset", "streaming", "litdata", "lance_iterable")
# LanceDB's own loaders (lance_cookbook.bench.lancedb_loaders, opt-in): ratios only, no target
LANCEDB = ("lancedb_stream_clump", "lancedb_stream_rows", "lancedb_permutation", "lancedb_stream_threads")
# "equal or better shuffle quality" (issue 14), within what one run's batches vary by
SHUFFLE_TOLERANCE = 0.05


def _shuffles_as_well(peer: dict[str, Any], ours: dict[str, Any]) -> bool:
    """Whether ``peer`` mixes labels and avoids repeated batches at least as well as ``ours``.

    It must mix labels into batches at least as well as ``ours`` and repeat no more of its batches from one
    epoch to the next. A figure missing on either side is not held against the peer.
    """
    mix_p, mix_o = peer.get("batch_label_entropy_vs_random"), ours.get("batch_label_entropy_vs_random")
    rep_p, rep_o = peer.get("repeated_batches"), ours.get("repeated_batches")
    mixes = mix_p is None or mix_o is None or mix_p >= mix_o - SHUFFLE_TOLERANCE
    reorders = rep_p is None or rep_o is None or rep_p <= rep_o + SHUFFLE_TOLERANCE
    return mixes and reorders


def _ratios(rate: dict[str, float], prefix: str = "") -> dict[str, float]:
    ratios: dict[str, float] = {}
    for num in NUMERATORS:
        for den in (*DENOMINATORS, *PEERS, *LANCEDB):
            if num != den and rate.get(num) and rate.get(den):
                ratios[f"{prefix}{num}/{den}"] = rate[num] / rate[den]
    return ratios


def ratios_and_targets(report: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Ratios of images/s between loaders, and the targets the recipe aims at (met or not).

    Cold-cache ratios (``--cache cold|both``) are keyed ``"cold " + name``.
    """
    loaders = report.get("loaders", {})
    rate = {k: v["images_per_s"] for k, v in loaders.items()}
    cold = {k: v.get("cold_images_per_s") or 0.0 for k, v in loaders.items()}
    ratios = {**_ratios(rate), **_ratios(cold, "cold ")}
    small = all(max(s) <= 64 for s in report["imagefolder"]["sample_sizes"])
    wanted = (
        [("lance_tv_uint8/imagefolder_pil", 4.0), ("lance_tv_uint8/imagefolder_tv", 1.5)]
        if small
        else [("lance_tv_uint8/imagefolder_pil", 2.0), ("lance_tv_uint8/bound_tv", 0.9)]
    )
    if rate.get("lance_tv_uint8_block"):  # issue 14: the block-shuffled recipe, warm page cache
        wanted += (
            [("lance_tv_uint8_block/imagefolder_pil", 4.0), ("lance_tv_uint8_block/imagefolder_tv", 1.2)]
            if small
            else [("lance_tv_uint8_block/imagefolder_pil", 2.0), ("lance_tv_uint8_block/bound_tv", 0.9)]
        )
    if cold.get("lance_tv_uint8_block") and small:  # issue 14: larger than memory, 32 px images
        wanted.append(("cold lance_tv_uint8_block/imagefolder_tv", 2.0))
        # against every peer that shuffles as well as the block sampler (equal or better shuffle quality)
        block = loaders["lance_tv_uint8_block"]
        wanted += [
            (f"cold lance_tv_uint8_block/{peer}", 1.0)
            for peer in PEERS
            if cold.get(peer) and _shuffles_as_well(loaders[peer], block)
        ]
    # a target whose loaders did not both run (in that regime) has no value: it is left out, not shown n/a
    targets = [
        {"ratio": name, "value": ratios[name], "target": goal, "met": ratios[name] >= goal}
        for name, goal in wanted
        if name in ratios
    ]
    conv = report.get("conversion")
    if small and conv:
        rate_ = conv["images_per_s"]
        targets.append(
            {"ratio": "conversion images/s", "value": rate_, "target": 10_000, "met": rate_ >= 10_000}
        )
    return ratios, targets


def _workers(n: int) -> str:
    return f"{n} worker{'' if n == 1 else 's'}"


def _fmt(value: float | None, spec: str) -> str | None:
    """``value`` formatted, or ``None`` where nothing was measured (None, NaN)."""
    return None if value is None or value != value else format(value, spec)


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


# A column of the table: header, width, the cell of one loader's result (None: not measured for that loader),
# and the header to use instead when the column before it is left out (its header named the group)
Column = tuple[str, int, Callable[[dict[str, Any]], str | None], str | None]


def _columns(loaders: dict[str, dict[str, Any]]) -> list[Column]:
    base = loaders.get("imagefolder_pil", {}).get("images_per_s")
    bound = loaders.get("bound_tv", {}).get("images_per_s")
    cold_base = loaders.get("imagefolder_pil", {}).get("cold_images_per_s")
    return [
        ("images/s", 9, lambda r: _fmt(r["images_per_s"] or None, ",.0f"), None),
        ("x (b)", 6, lambda r: _fmt(_ratio(r["images_per_s"], base), ".2f"), None),
        ("x tv bnd", 8, lambda r: _fmt(_ratio(r["images_per_s"], bound), ".2f"), None),
        ("start s", 7, lambda r: None if r["key"] in BOUNDS else _fmt(r.get("startup_s"), ".2f"), None),
        ("main MiB", 8, lambda r: _fmt(r.get("main_peak_rss_mib") or None, ".0f"), None),
        ("wrk MiB", 7, lambda r: _fmt(max(r.get("worker_peak_rss_mib") or [None]), ".0f"), None),
        ("CPU us/img main", 15, lambda r: _fmt(r.get("main_cpu_us"), ",.0f"), None),
        ("wrk", 5, lambda r: _fmt(r.get("worker_cpu_us"), ",.0f"), "CPU us/img wrk"),
        ("mix", 4, lambda r: _fmt(r.get("batch_label_entropy_vs_random"), ".2f"), None),
        ("same", 4, lambda r: _fmt(r.get("repeated_batches"), ".2f"), None),
        # --cache cold|both: each loader's files evicted before each of these epochs
        ("cold img/s", 10, lambda r: _fmt(r.get("cold_images_per_s"), ",.0f"), None),
        ("x (b)", 6, lambda r: _fmt(_ratio(r.get("cold_images_per_s"), cold_base), ".2f"), None),
        ("CPU main", 8, lambda r: _fmt(r.get("cold_main_cpu_us"), ",.0f"), None),
        ("wrk", 5, lambda r: _fmt(r.get("cold_worker_cpu_us"), ",.0f"), "cold CPU wrk"),
    ]


def format_table(report: dict[str, Any]) -> str:
    """The report as the table ``python -m lance_cookbook.bench`` prints.

    Only what the run measured (a column no loader has a figure for, a target whose loaders did not run, are
    left out; ``-`` marks a figure that does not apply to one loader, such as a decode bound's start-up).
    """
    cfg, stats = report["config"], report["imagefolder"]
    sizes = ", ".join(f"{w}x{h}" for w, h in stats["sample_sizes"][:3])
    loaders = report.get("loaders", {})
    results = list(loaders.values())
    width = max([48, *(len(r["label"]) for r in results)])
    title = f"{stats['images']:,} JPEGs ({sizes}; {stats['mean_image_bytes'] / 1024:,.1f} KiB each)"
    if not results:  # --loaders none: conversion and storage only
        return "\n".join([title, *_footer(report)])
    lines = [
        f"{title} -> {cfg['image_size']}x{cfg['image_size']}, batch {cfg['batch_size']}, "
        f"{_workers(cfg['workers'])}, best of {cfg['timed_rounds']} timed epoch(s) after a warm-up"
        f"{_cache_note(cfg.get('cache', 'warm'))}",
        "",
    ]
    heads, cells, dropped = [f"{'loader':{width}s}"], [[f"{r['label']:{width}s}"] for r in results], False
    for head, col_width, cell, alone in _columns(loaders):
        column = [cell(r) for r in results]
        if all(c is None for c in column):
            dropped = True
            continue
        head = alone if dropped and alone else head
        col_width = max(col_width, len(head))
        heads.append(f"{head:>{col_width}s}")
        for row, c in zip(cells, column, strict=True):
            row.append(f"{'-' if c is None else c:>{col_width}s}")
        dropped = False
    mix_shown = any(h.strip() == "mix" for h in heads)
    same_shown = any(h.strip() == "same" for h in heads)
    head = " ".join(heads)
    lines += [head, "-" * len(head), *(" ".join(row) for row in cells)]
    if mix_shown and "random_batch_label_entropy" in report:
        lines += [
            "",
            "mix: mean label entropy of a batch as a fraction of uniformly random batches' "
            f"{report['random_batch_label_entropy']:.2f} bits (1.00: classes mixed as by a full shuffle)",
        ]
    if same_shown:
        lines += [""] if not mix_shown else []
        lines.append(
            "same: fraction of an epoch's batches that were also batches of the epoch before (1.00: the "
            "same batches every epoch; 0.00: rows reshuffled into new batches)"
        )
    if report.get("breakdown"):
        lines += ["", "where a worker's time goes (--breakdown; CPU us per image, one torch thread):"]
        lines += [f"  {step['step']:44s} {step['cpu_us_per_image']:8.1f}" for step in report["breakdown"]]
    return "\n".join(lines + _footer(report))


def _footer(report: dict[str, Any]) -> list[str]:
    """The lines after the loaders: conversion, writers, storage, targets."""
    conv = report.get("conversion")
    lines = [""]
    if conv:
        lines.append(
            f"conversion (imagefolder -> Lance, fresh process): {conv['rows']:,} images in "
            f"{conv['seconds']:.2f} s "
            f"= {conv['images_per_s']:,.0f} images/s; peak RSS {conv['peak_rss'] / MiB:,.0f} MiB "
            f"({conv['rss_before'] / MiB:,.0f} MiB after imports)"
        )
    for key, pc in report.get("peer_conversion", {}).items():
        settings = ", ".join(
            f"{k}={v}" for k, v in pc.items() if k not in ("rows", "seconds", "images_per_s", "peak_rss")
        )
        rss = f"; peak RSS {pc['peak_rss'] / MiB:,.0f} MiB" if pc.get("peak_rss") else ""
        lines.append(
            f"{key} writer (fresh process; {settings}): {pc['rows']:,} images in {pc['seconds']:.2f} s = "
            f"{pc['images_per_s']:,.0f} images/s{rss}"
        )
    hfp = report.get("hf_prepare")
    if hfp:
        lines.append(
            f"HF datasets load_dataset(imagefolder): {hfp['seconds']:.2f} s = "
            f"{hfp['images_per_s']:,.0f} images/s"
        )
    st = report["storage"]
    disk = (
        f"bytes on disk: image folder {st['imagefolder_bytes'] / MiB:,.1f} MiB "
        f"({st['imagefolder_allocated_bytes'] / MiB:,.1f} MiB allocated in blocks), "
        f"Lance {st['lance_bytes'] / MiB:,.1f} MiB ({st['lance_allocated_bytes'] / MiB:,.1f} MiB allocated)"
    )
    for key in PEERS:
        if f"{key}_bytes" in st:
            disk += f", {key} {st[f'{key}_bytes'] / MiB:,.1f} MiB"
    if "hf_cache_bytes" in st:
        disk += f", HF cache {st['hf_cache_bytes'] / MiB:,.2f} MiB (+ the image folder it points to)"
    lines.append(disk)
    later = report.get("later_loader_first_batch_s")
    if isinstance(later, dict) and later:  # a list in reports of the first version: not shown
        shown = ", ".join(f"{key} {seconds:.2f} s" for key, seconds in later.items())
        lines.append(f"first batch of each forkserver loader after the first (target <= 1 s): {shown}")
    for t in report.get("targets", []):
        value = t["value"]
        if value is None:  # written by an older version: a target whose loaders did not run
            continue
        # rounded down: a ratio of 3.998 must not print as 4.00x beside "NOT met"
        shown = f"{value:,.0f}" if value > 100 else f"{math.floor(value * 100) / 100:.2f}x"
        lines.append(f"target {t['ratio']} >= {t['target']:g}: {shown} {'met' if t['met'] else 'NOT met'}")
    return lines


def _cache_note(cache: str) -> str:
    return {
        "warm": "",
        "cold": "; cold page cache (each loader's files evicted before each timed epoch)",
        "both": "; warm and cold page cache (cold: each loader's files evicted before each timed epoch)",
    }[cache]


def _plot_series(loaders: list[dict[str, Any]]) -> list[tuple[str, list[float], float]]:
    """(regime, images/s of each loader, bar alpha) for each regime some loader was measured in.

    Warm, then cold (pale); 0.0 where one loader was not.
    """
    series = [
        ("warm", [r["images_per_s"] or 0.0 for r in loaders], 1.0),
        ("cold", [r.get("cold_images_per_s") or 0.0 for r in loaders], 0.45),
    ]
    return [s for s in series if any(s[1])] or series[:1]


def plot(report: dict[str, Any], path: str) -> None:
    """A bar chart of each loader's images/s, written to ``path`` (PNG).

    Warm and cold bars side by side where the run measured the cold regime.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a loader with no figure in any regime has no bar to show
    loaders = [r for r in report["loaders"].values() if r["images_per_s"] or r.get("cold_images_per_s")][::-1]
    colors = {"bound": "#9e9e9e", "imagefolder": "#ef8a17", "hf": "#d1495b", "lance": "#00798c"}
    peer, lancedb = "#6a4c93", "#4f9d69"
    names = [r["label"] for r in loaders]
    bar_colors = [
        lancedb
        if r["key"] in LANCEDB
        else colors["lance"]
        if r["key"].startswith("lance")
        else (peer if r["key"] in PEERS else colors.get(r["key"].split("_")[0], peer))
        for r in loaders
    ]
    series = _plot_series(loaders)
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(loaders) * len(series) ** 0.5 + 1.5))
    top = 1.0
    for i, (regime, rates, alpha) in enumerate(series):
        offset = (len(series) - 1) / 2 * height - i * height  # first series on top of each group
        ys = [y + offset for y in range(len(loaders))]
        bars = ax.barh(ys, rates, height=height, color=bar_colors, alpha=alpha, label=regime)
        for bar, rate in zip(bars, rates, strict=True):
            if not rate:  # not measured in this regime: no bar, no "0"
                continue
            label = f" {rate:,.0f}" + (f" {regime}" if len(series) > 1 else "")
            y = bar.get_y() + bar.get_height() / 2
            ax.text(bar.get_width(), y, label, va="center", fontsize=7)
        top = max([top, *rates])
    ax.set_yticks(range(len(loaders)), names)
    cfg = report["config"]
    ax.set_xlabel("images/s (best timed epoch)" + ("; pale bars: cold page cache" if len(series) > 1 else ""))
    shown = tuple(regime for regime, _, _ in series)  # the regimes measured, whatever --cache said
    ax.set_title(
        f"{report['imagefolder']['images']:,} images -> {cfg['image_size']} px, batch {cfg['batch_size']}, "
        f"{_workers(cfg['workers'])}"
        + {("warm",): "", ("cold",): "\ncold page cache", ("warm", "cold"): "\nwarm and cold page cache"}[
            shown
        ],
        fontsize=10,
    )
    ax.set_xlim(0, top * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
