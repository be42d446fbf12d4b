"""Plots render to PNG under Agg with axes in nats; the comparison table's arithmetic."""

import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from basin_volume import VolumeResult  # noqa: E402
from basin_volume.plots import (  # noqa: E402
    compare_results,
    format_comparison,
    plot_results,
    plot_scan,
    running_logmeanexp,
)
from basin_volume.result import DirectionRecord  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def fake_result(shift: float, n: int = 40, *, seed: int = 0, measure="gaussian") -> VolumeResult:
    """A result with realistic magnitudes: estimates near -5000 nats, spread over ~1000."""
    gen = torch.Generator().manual_seed(seed)
    est = shift - 5000.0 - 300.0 * torch.rand(n, generator=gen, dtype=torch.float64).log().neg()
    radii = 3.0 + torch.rand(n, generator=gen, dtype=torch.float64)
    records = [
        DirectionRecord(
            index=k,
            estimate=float(est[k]),
            delta=0.01,
            prop=1.0,
            radius=float(radii[k]) if k != 3 else math.inf,
            logabsint=float(est[k]) + 5000.0,
            n_evals=3,
            status="converged" if k != 3 else "unbounded",
            slope=2.0,
        )
        for k in range(n)
    ]
    return VolumeResult.from_records(
        records, dim=4810, measure=measure, cutoff=0.01, sigma=0.26, rtol=0.01, seed=seed
    )


def axis_labels(fig):
    return [t for ax in fig.axes for t in (ax.get_xlabel(), ax.get_ylabel())]


def test_plot_results_renders_png_with_axes_in_nats(tmp_path):
    a, b = fake_result(0.0), fake_result(150.0, seed=1)
    a.save(tmp_path / "a.json")
    out = tmp_path / "two.png"
    fig = plot_results([tmp_path / "a.json", b], out, labels=["clean", "poisoned"])
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 20_000
    labels = axis_labels(fig)
    assert sum("nats" in label for label in labels) >= 2
    assert any("radius" in label for label in labels)
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]
    assert any(text.startswith("clean: ") and "nats" in text for text in legend)
    assert any("1 unbounded" in text and "converged" not in text for text in legend)
    # No hidden offset such as "+5e3" on the nats axes: tick labels are the full numbers.
    fig.canvas.draw()
    assert all(not ax.xaxis.get_offset_text().get_text() for ax in fig.axes[:1])
    assert all(not ax.yaxis.get_offset_text().get_text() for ax in fig.axes[1:2])
    single = plot_results(a, tmp_path / "one.pdf")
    assert (tmp_path / "one.pdf").read_bytes()[:4] == b"%PDF"
    assert "ESS" in single._suptitle.get_text()  # low-ESS caveat in the title


def test_running_logmeanexp_ends_at_log_volume_and_band_contains_it():
    res = fake_result(0.0, n=25)
    n, value, low, high = running_logmeanexp(res.estimates, n_points=10)
    assert int(n[-1]) == 25 and int(n[0]) == 1
    assert math.isclose(float(value[-1]), res.log_volume, rel_tol=0, abs_tol=1e-9)
    assert bool((low <= value + 1e-9).all()) and bool((high >= value - 1e-9).all())


def test_plot_scan_from_rows_and_file(tmp_path):
    rows = [
        {
            "name": f"cutoff_{c:g}",
            "axis": "cutoff",
            "value": c,
            "log_volume": -5000.0 + 1000 * math.log10(c),
            "low": -5100.0 + 1000 * math.log10(c),
            "high": -4990.0 + 1000 * math.log10(c),
            "ess": ess,
            "n_samples": 20,
            "measure": "gaussian",
        }
        for c, ess in ((1e-3, 1.0), (1e-2, 8.0), (1e-1, 12.0))
    ]
    fig = plot_scan(rows, tmp_path / "scan.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "nats" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    assert (tmp_path / "scan.png").read_bytes()[:8] == PNG
    import json

    (tmp_path / "scan.json").write_text(json.dumps({"axis": "step", "rows": rows}))
    fig = plot_scan(tmp_path / "scan.json")
    assert fig.axes[0].get_xlabel() == "training step"


def test_compare_results_differences_in_nats_and_log10(tmp_path):
    a, b = fake_result(0.0), fake_result(230.0, seed=1)
    rows = compare_results([a, b], labels=["a", "b"], reference=0)
    assert rows[0]["diff_nats"] == 0.0
    assert math.isclose(rows[1]["diff_nats"], b.log_volume - a.log_volume, rel_tol=1e-12)
    assert math.isclose(rows[1]["diff_log10"], rows[1]["diff_nats"] / math.log(10), rel_tol=1e-12)
    assert rows[1]["low"] <= rows[1]["log_volume"] <= rows[1]["high"]
    text = format_comparison(rows)
    assert "log_volume (nats)" in text and "diff (log10)" in text and "against 'a'" in text
    mixed = compare_results([a, fake_result(0.0, measure="uniform")])
    assert "different measures" in format_comparison(mixed)
    with pytest.raises(ValueError, match="labels"):
        compare_results([a, b], labels=["only one"])
    with pytest.raises(ValueError, match="reference"):
        compare_results([a, b], reference=2)
