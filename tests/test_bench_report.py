"""The benchmark's report shows only what the run measured: no target line whose loaders did not run, no
column that is empty for every loader, no bar for a regime not measured. Built on small report dicts in the
shape ``--json`` writes (each loader's entry is a ``Result`` as the runner stores it), so no loader runs."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from lance_cookbook.bench import report as rep
from lance_cookbook.bench.candidates import BOUNDS, LOADERS, Result

COLD_COLUMNS = ("cold img/s", "CPU main")


def _loader(key: str, rate: float, *, cache: str = "warm", workers: int = 2, mix: bool = True) -> dict:
    """One loader's figures as the runner writes them for ``--cache cache`` and ``workers`` workers."""
    res = Result(key, LOADERS[key], main_peak_rss_mib=800.0)
    bound = key in BOUNDS
    res.startup_s = 0.0 if bound else 3.0
    if cache in ("warm", "both"):
        res.images_per_s, res.rounds = rate, [rate]
        if not bound:
            res.main_cpu_us = 4.0
            res.worker_cpu_us = 50.0 if workers else None
    if cache in ("cold", "both"):
        res.cold_images_per_s, res.cold_rounds = rate / 2, [rate / 2]
        if not bound:
            res.cold_main_cpu_us = 5.0
            res.cold_worker_cpu_us = 80.0 if workers else None
    if not bound:
        res.worker_peak_rss_mib = [500.0] * workers
        if mix:
            res.batch_label_entropy, res.batch_label_entropy_vs_random = 3.2, 1.0
    return asdict(res)


def _report(rates: dict[str, float], *, cache: str = "warm", workers: int = 2, mix: bool = True) -> dict:
    """A report of a 32x32 run of the loaders in ``rates`` (images/s; cold ones are half), with its ratios
    and targets computed as the runner does."""
    report = {
        "config": {"image_size": 32, "batch_size": 64, "workers": workers, "timed_rounds": 3, "cache": cache},
        "imagefolder": {"images": 1000, "mean_image_bytes": 1100.0, "sample_sizes": [[32, 32]]},
        "conversion": {
            "rows": 1000,
            "seconds": 0.1,
            "images_per_s": 10_000.0,
            "peak_rss": 200 << 20,
            "rss_before": 150 << 20,
        },
        "storage": {
            "imagefolder_bytes": 1 << 20,
            "imagefolder_allocated_bytes": 4 << 20,
            "lance_bytes": 1 << 20,
            "lance_allocated_bytes": 1 << 20,
        },
        "loaders": {k: _loader(k, rate, cache=cache, workers=workers, mix=mix) for k, rate in rates.items()},
    }
    if mix:
        report["random_batch_label_entropy"] = 3.22
    report["ratios"], report["targets"] = rep.ratios_and_targets(report)
    return report


def _head(table: str) -> str:
    """The table's header line (the line above the dashes), its columns one space apart."""
    lines = table.splitlines()
    dashes = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    return " ".join(lines[dashes - 1].split())


def _cells(table: str, key: str) -> list[str]:
    """The cells after the label in the row of loader ``key``."""
    row = next(line for line in table.splitlines() if line.startswith(LOADERS[key]))
    return row[len(LOADERS[key]) :].split()


def _targets(table: str) -> list[str]:
    return [
        line.split(" >= ")[0].removeprefix("target ")
        for line in table.splitlines()
        if line.startswith("target ")
    ]


# every core loader (the cells checked below come from these three rates)
EVERY_RATE = {key: 1000.0 for key in LOADERS} | {
    "bound_tv": 2000.0,
    "imagefolder_pil": 3000.0,
    "lance_tv_uint8": 8000.0,
}
CHAPTER_RATES = {
    "imagefolder_pil": 4000.0,
    "imagefolder_tv": 18000.0,
    "lance_pil_float32": 4200.0,
    "lance_tv_uint8": 17000.0,
    "lance_tv_uint8_block": 19000.0,
}


def test_everything_run_shows_every_column_and_target():
    report = _report(EVERY_RATE, cache="both")
    table = rep.format_table(report)
    assert _head(table) == (
        "loader images/s x (b) x tv bnd start s main MiB wrk MiB CPU us/img main wrk mix "
        "cold img/s x (b) CPU main wrk"
    )
    assert _targets(table) == [
        "lance_tv_uint8/imagefolder_pil",
        "lance_tv_uint8/imagefolder_tv",
        "lance_tv_uint8_block/imagefolder_pil",
        "lance_tv_uint8_block/imagefolder_tv",
        "cold lance_tv_uint8_block/imagefolder_tv",
        "conversion images/s",
    ]
    assert "mix: mean label entropy" in table
    # a decode bound has no start-up, workers or batches: "-" in those cells, never nan or n/a
    bound = ["2,000", "0.67", "1.00", "-", "800", "-", "-", "-", "-", "1,000", "0.67", "-", "-"]
    assert _cells(table, "bound_tv") == bound
    assert _cells(table, "lance_tv_uint8") == [
        "8,000", "2.67", "4.00", "3.00", "800", "500", "4", "50", "1.00", "4,000", "2.67", "5", "80"
    ]  # fmt: skip
    assert "nan" not in table and "n/a" not in table


def test_loaders_not_run_leave_no_target_and_no_bound_column():
    report = _report(CHAPTER_RATES)  # no decode bounds, warm only: the chapter's loaders
    table = rep.format_table(report)
    assert "nan" not in table and "n/a" not in table
    # bound_tv and the cold regime not run: no column for them; imagefolder_pil ran: x (b) stays
    assert _head(table) == "loader images/s x (b) start s main MiB wrk MiB CPU us/img main wrk mix"
    assert _targets(table) == [
        "lance_tv_uint8/imagefolder_pil",
        "lance_tv_uint8/imagefolder_tv",
        "lance_tv_uint8_block/imagefolder_pil",
        "lance_tv_uint8_block/imagefolder_tv",
        "conversion images/s",
    ]

    only_lance = _report({"lance_tv_uint8": 17000.0, "lance_tv_uint8_block": 19000.0})
    assert [t["ratio"] for t in only_lance["targets"]] == ["conversion images/s"]
    table = rep.format_table(only_lance)
    assert "x (b)" not in table and "target lance" not in table
    assert _targets(table) == ["conversion images/s"]


def test_cold_run_has_no_warm_columns_and_no_warm_targets():
    report = _report(CHAPTER_RATES, cache="cold")
    table = rep.format_table(report)
    assert "nan" not in table and "n/a" not in table
    assert _head(table) == "loader start s main MiB wrk MiB mix cold img/s x (b) CPU main wrk"
    assert _targets(table) == ["cold lance_tv_uint8_block/imagefolder_tv", "conversion images/s"]
    assert all(t["value"] is not None for t in report["targets"])


def test_warm_run_has_no_cold_columns():
    table = rep.format_table(_report(EVERY_RATE))
    assert not any(col in table for col in COLD_COLUMNS)
    assert "cold lance" not in table
    assert "x tv bnd" in table  # bound_tv ran


def test_columns_without_workers_or_mix_are_left_out():
    table = rep.format_table(_report(CHAPTER_RATES, workers=0, mix=False))
    assert _head(table) == "loader images/s x (b) start s main MiB CPU us/img main"
    assert "mix: mean label entropy" not in table and "nan" not in table and "n/a" not in table


def test_a_lone_worker_cpu_column_names_itself():
    report = _report(CHAPTER_RATES)
    for res in report["loaders"].values():
        res["main_cpu_us"] = None
    assert _head(rep.format_table(report)).endswith("wrk MiB CPU us/img wrk mix")


def test_targets_without_a_value_from_older_reports_are_skipped():
    report = _report(CHAPTER_RATES)
    report["targets"].append({"ratio": "lance_tv_uint8/bound_tv", "value": None, "target": 0.9, "met": False})
    table = rep.format_table(report)
    assert "bound_tv" not in table and "n/a" not in table


def _photo(report: dict, **rates: float) -> dict:
    for key, rate in rates.items():
        report["loaders"][key] = _loader(key, rate)
    return report


def test_photo_targets_need_the_decode_bound():
    rates = {"imagefolder_pil": 900.0, "lance_tv_uint8": 2000.0}
    report = _report(rates)
    report["imagefolder"]["sample_sizes"] = [[500, 375]]
    _, targets = rep.ratios_and_targets(report)
    assert [t["ratio"] for t in targets] == ["lance_tv_uint8/imagefolder_pil"]
    _, targets = rep.ratios_and_targets(_photo(report, bound_tv=2900.0))
    assert [t["ratio"] for t in targets] == ["lance_tv_uint8/imagefolder_pil", "lance_tv_uint8/bound_tv"]


@pytest.fixture
def drawn(monkeypatch):
    """The figure ``plot`` drew (captured as it is closed)."""
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close

    def close(fig=None):
        figures.append(fig)
        real_close(fig)

    monkeypatch.setattr(plt, "close", close)
    return figures


def _bar_labels(fig) -> list[str]:
    return [t.get_text().strip() for t in fig.axes[0].texts]


@pytest.mark.parametrize(
    "cache, regimes, title",
    [
        ("warm", [], ""),
        ("cold", [], "cold page cache"),
        ("both", ["warm", "cold"], "warm and cold page cache"),
    ],
)
def test_plot_shows_the_regimes_measured(tmp_path, drawn, cache, regimes, title):
    report = _report(CHAPTER_RATES, cache=cache)
    rep.plot(report, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = _bar_labels(drawn[0])
    assert len(labels) == len(CHAPTER_RATES) * max(1, len(regimes))
    assert not any(label.startswith("0") for label in labels)  # no bar of a regime not measured
    for regime in regimes:
        assert sum(label.endswith(regime) for label in labels) == len(CHAPTER_RATES)
    ax = drawn[0].axes[0]
    assert ax.get_title().split("\n")[1:] == ([title] if title else [])
    assert [t.get_text() for t in ax.get_yticklabels()] == [LOADERS[k] for k in CHAPTER_RATES][::-1]


def test_plot_leaves_out_a_loader_or_regime_without_figures(tmp_path, drawn):
    report = _report(CHAPTER_RATES, cache="both")
    report["loaders"]["lance_pil_float32"]["cold_images_per_s"] = None  # measured warm only
    report["loaders"]["lance_tv_uint8"].update(images_per_s=0.0, cold_images_per_s=None)  # nothing
    rep.plot(report, str(tmp_path / "bench.png"))
    labels = _bar_labels(drawn[0])
    assert len(labels) == 2 * 4 - 1 and not any(label.startswith("0") for label in labels)
    ticks = [t.get_text() for t in drawn[0].axes[0].get_yticklabels()]
    assert LOADERS["lance_tv_uint8"] not in ticks and LOADERS["lance_pil_float32"] in ticks


def test_no_loaders_prints_conversion_and_storage_only():
    table = rep.format_table(_report({}))  # --loaders none
    assert "loader" not in table and "spawn" not in table and "---" not in table
    assert table.splitlines()[0] == "1,000 JPEGs (32x32; 1.1 KiB each)"
    assert "conversion (imagefolder -> Lance" in table and _targets(table) == ["conversion images/s"]


def test_a_peer_that_shuffles_worse_gets_no_cold_target():
    # "the block sampler >= every peer at equal or better shuffle quality": a peer whose batches repeat
    # every epoch (Lance's iterable, litdata here) is shown but not a target; one that reshuffles is
    rates = {"imagefolder_pil": 100.0, "imagefolder_tv": 200.0, "lance_tv_uint8_block": 400.0}
    report = _report(rates, cache="both")
    block = report["loaders"]["lance_tv_uint8_block"]
    block["repeated_batches"] = 0.0
    for peer, repeated in (("webdataset", 0.0), ("litdata", 1.0)):
        res = Result(peer, peer, images_per_s=300.0, cold_images_per_s=500.0, repeated_batches=repeated)
        res.batch_label_entropy_vs_random = 1.0
        report["loaders"][peer] = asdict(res)
    _, targets = rep.ratios_and_targets(report)
    names = {t["ratio"]: t for t in targets}
    assert "cold lance_tv_uint8_block/webdataset" in names  # reshuffles as well: a target (and not met)
    assert not names["cold lance_tv_uint8_block/webdataset"]["met"]
    assert "cold lance_tv_uint8_block/litdata" not in names  # same batches every epoch: no target
    report["loaders"]["webdataset"]["batch_label_entropy_vs_random"] = 0.5  # mixes classes worse
    assert "cold lance_tv_uint8_block/webdataset" not in {
        t["ratio"] for t in rep.ratios_and_targets(report)[1]
    }


def test_a_ratio_just_under_its_target_does_not_print_as_the_target():
    report = _report({"imagefolder_pil": 1000.0, "lance_tv_uint8": 3998.0})
    assert "target lance_tv_uint8/imagefolder_pil >= 4: 3.99x NOT met" in rep.format_table(report)


def test_later_loaders_first_batch_is_printed_when_measured():
    report = _report({"imagefolder_pil": 100.0, "lance_tv_uint8": 300.0})
    assert "forkserver loader after the first" not in rep.format_table(report)
    report["later_loader_first_batch_s"] = {"lance_tv_uint8_block": 0.84}
    line = (
        "first batch of each forkserver loader after the first (target <= 1 s): lance_tv_uint8_block 0.84 s"
    )
    assert line in rep.format_table(report)
