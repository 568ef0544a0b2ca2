"""docs/results.md is generated from the committed study data, and nothing else.

The report stage renders the page from ``experiments/data`` alone; this regenerates it and
compares it with the committed page, so a number typed by hand, or a table left stale after
a rerun, fails here.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from experiments import analysis
from experiments.report import render_markdown

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "experiments" / "data"


def test_results_md_equals_what_the_committed_data_renders() -> None:
    committed = (REPO / "docs" / "results.md").read_text()
    rendered = render_markdown(DATA)
    diff = "".join(difflib.unified_diff(committed.splitlines(True), rendered.splitlines(True),
                                        "docs/results.md", "rendered from experiments/data", n=1))
    assert not diff, diff[:4000]


def test_the_committed_data_is_small_and_complete() -> None:
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert size < 8 * 1024 * 1024, f"experiments/data holds {size / 1e6:.1f} MB"
    models = analysis.read_table(DATA / "models.csv")
    for pair in analysis.shown_pairs(models):
        for row in pair.ordered:
            assert (DATA / "samples" / f"{row['name']}.csv").is_file(), row["name"]


def test_partial_rank_correlation_matches_its_definition() -> None:
    """partial_spearman against the textbook formula on ranks:
    (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))."""
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(0)
    z = rng.normal(size=60)
    x = z + rng.normal(size=60)
    y = z + 0.5 * x + rng.normal(size=60)
    rxy, rxz, ryz = (stats.spearmanr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    expected = (rxy - rxz * ryz) / np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    rho, p, n = analysis.partial_spearman(x, y, z)
    assert abs(rho - expected) < 1e-12 and n == 60 and 0 <= p <= 1
