"""Tests for the closed-loop figures and the self-contained HTML report."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from llm_auction.evaluation.report import html_report, plot_comparison, plot_epoch_curves, write_report
from llm_auction.simulator.loop import revenue_change

PNG_MAGIC = b"\x89PNG"


def est(mean: float | None, half: float | None = 0.1) -> dict:
    if mean is None:
        return {"mean": None, "ci": [None, None]}
    if half is None:
        return {"mean": mean, "ci": [None, None]}
    return {"mean": mean, "ci": [mean - half, mean + half]}


def metrics(revenue: float | None, welfare: float, itctr: float | None, ad_load: float) -> dict:
    return {
        "revenue": est(revenue),
        "social_welfare": est(welfare),
        "itctr": est(itctr, 0.01),
        "ad_load": est(ad_load, 0.05),
    }


@pytest.fixture
def epochs() -> list[dict]:
    return [
        {
            "epoch": 0,
            "policy_version": "1",
            "policy": metrics(1.0, 2.0, None, 1.5),
            "baselines": {
                "pre_generation": metrics(0.9, 1.9, 0.05, 1.4),
                "post_generation": metrics(1.1, 2.1, 0.06, 1.6),
            },
            "gate": {"passed": True},
        },
        {
            "epoch": 1,
            "policy_version": "2",
            "policy": metrics(None, 2.2, 0.07, 1.7),
            # post_generation missing in this epoch
            "baselines": {"pre_generation": metrics(0.95, 1.95, 0.055, 1.45)},
            "gate": {"passed": False},
        },
        {
            "epoch": 2,
            "policy_version": "3",
            "policy": metrics(1.3, 2.4, 0.08, 1.8),
            "baselines": {"pre_generation": {**metrics(0.97, 1.97, None, 1.5)}},
            "gate": {"passed": True},
        },
    ]


def assert_png(path: Path) -> None:
    assert path.exists()
    data = path.read_bytes()
    assert len(data) > 0
    assert data.startswith(PNG_MAGIC)


def test_plot_epoch_curves_writes_png(tmp_path: Path, epochs: list[dict]) -> None:
    out = plot_epoch_curves(epochs, tmp_path / "nested" / "dir" / "epochs.png")
    assert out == tmp_path / "nested" / "dir" / "epochs.png"
    assert_png(out)


def test_plot_epoch_curves_single_metric_and_all_none(tmp_path: Path, epochs: list[dict]) -> None:
    for entry in epochs:
        entry["policy"]["revenue"] = est(None)
    assert_png(plot_epoch_curves(epochs, tmp_path / "one.png", metrics=("revenue",)))
    assert_png(plot_epoch_curves(epochs, tmp_path / "three.png", metrics=("revenue", "itctr", "nope")))


def test_plot_comparison_writes_png(tmp_path: Path) -> None:
    rows = {
        "candidate v3": {"reward": est(0.5), "revenue": est(1.3), "itctr": est(None), "ad_load": est(1.8)},
        "champion v2": {"reward": est(0.4), "revenue": est(1.2, None), "ad_load": est(1.7)},
        "pre_generation": {"revenue": est(0.9), "itctr": est(0.05, 0.01), "ad_load": est(1.4)},
    }
    assert_png(plot_comparison(rows, tmp_path / "cmp" / "comparison.png"))


def test_plot_comparison_leaves_out_absent_metric(tmp_path: Path) -> None:
    # "format_error_rate" (a default metric) appears in no row: no crash, panel left out.
    rows = {"a": {"revenue": est(1.0)}, "b": {"revenue": est(1.2), "reward": est(None)}}
    assert_png(plot_comparison(rows, tmp_path / "cmp.png"))
    assert_png(plot_comparison(rows, tmp_path / "none.png", metrics=("format_error_rate",)))


def test_html_report_and_write_report(tmp_path: Path, epochs: list[dict]) -> None:
    images = [
        plot_epoch_curves(epochs, tmp_path / "epochs.png"),
        plot_comparison({"p": {"revenue": est(1.0)}}, tmp_path / "comparison.png"),
    ]
    tables = {
        "Gate <checks>": (
            ["check", "verdict"],
            [["revenue >= champion", "pass"], ["<b>x</b>", "fail"], ["passable", "failed"]],
        )
    }
    page = html_report(
        "Closed loop & IRPO",
        {"champion": "v2", "gate": "pass"},
        tables,
        images,
        notes=["note <1>"],
    )
    assert page.startswith("<!DOCTYPE html>")
    assert "Closed loop &amp; IRPO" in page
    assert page.count('<img src="data:image/png;base64,') == len(images)
    for image in images:
        assert base64.b64encode(image.read_bytes()).decode("ascii") in page
        assert f"<figcaption>{image.name}</figcaption>" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert "<b>x</b>" not in page
    assert "Gate &lt;checks&gt;" in page
    assert '<td class="pass">pass</td>' in page
    assert '<td class="fail">fail</td>' in page
    assert "<td>passable</td>" in page and "<td>failed</td>" in page
    assert "<li>note &lt;1&gt;</li>" in page
    assert "<td>champion</td>" in page and "<td>v2</td>" in page

    out = write_report(tmp_path / "out", "Closed loop & IRPO", {"gate": "fail"}, tables, images, ["n"])
    assert out == tmp_path / "out" / "report.html"
    text = out.read_text(encoding="utf-8")
    assert "Closed loop &amp; IRPO" in text
    assert '<td class="fail">fail</td>' in text


def test_revenue_change_guards_a_zero_or_undefined_start():
    """The loop summary divides by pi_0's revenue: 0, NaN or None (an undefined mean) must not crash it."""
    assert revenue_change(2.0, 3.0) == "2.000 -> 3.000 (+50.0%)"
    assert revenue_change(0.0, 0.25) == "0.000 -> 0.250 (+0.250 absolute)"
    assert revenue_change(float("nan"), 1.0) == "n/a -> 1.000"
    assert revenue_change(None, 1.0) == "n/a -> 1.000"
    assert revenue_change(1.0, None) == "1.000 -> n/a"
