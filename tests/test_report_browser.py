"""The HTML report in a real browser: headless Chromium, with the network blocked, draws
the inline CSS, the inline SVG scatter with its band (random floor, references) and every
inline PNG, the "same answer, attention moved" grids included.

CI installs Chromium (.ci/run); where it is missing this test fails when
SP2PS_REQUIRE_BROWSER is set and is skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx.report import render_html
from tests.test_report import _banded_report, _fake_report


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "headless Chromium is needed: apt-get install -y chromium"
        if os.environ.get("SP2PS_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def screenshot(page: Path, out: Path, profile: Path, size: tuple[int, int] = (1300, 2600)
               ) -> np.ndarray:
    import imageio.v3 as iio

    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # No network at all: a page that needed one would show holes.
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         f"--user-data-dir={profile}", "--hide-scrollbars", f"--screenshot={out}",
         f"--window-size={size[0]},{size[1]}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    return iio.imread(out)[..., :3].astype(np.int32)


def saturated(image: np.ndarray) -> int:
    """Pixels of strong colour (CAM overlays, plot markers), not greys or the page's tints."""
    return int(((image.max(axis=-1) - image.min(axis=-1)) > 120).sum())


def without_pngs(page: str) -> str:
    return re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = render_html(_fake_report())
    full = tmp_path / "report.html"
    full.write_text(page, encoding="utf-8")
    # The same page with every image and the SVG removed: what a page whose pictures failed
    # to load would look like.
    bare = tmp_path / "bare.html"
    stripped = re.sub(r"<svg.*?</svg>", "", without_pngs(page), flags=re.S)
    bare.write_text(stripped, encoding="utf-8")
    drawn = screenshot(full, tmp_path / "full.png", tmp_path / "profile-1")
    empty = screenshot(bare, tmp_path / "bare.png", tmp_path / "profile-2")
    assert drawn.shape == (2600, 1300, 3)
    # Styled: the header is dark text on white, the ranking rows exist in both.
    assert (drawn[:60] < 80).all(axis=-1).any() and (drawn[0, 0] == 255).all()
    # The pictures: 32 overlays of random 16x16 CAMs in jet, the colour legend and the
    # scatter's markers add tens of thousands of strongly coloured pixels to what the text,
    # score bars and heat-map cells have (~4,400 here).
    assert saturated(drawn) - saturated(empty) > 30_000
    assert saturated(drawn) > 5 * saturated(empty)


# The band's lines and the references' range in the scatter's SVG, found by their colours
# (sp2ps_onnx.figures.FLOOR_STYLE, REFERENCE_STYLE, REFERENCE_RANGE_COLOR).
BAND_PATH = re.compile(r'<path [^>]*style="[^"]*(?:stroke|fill): #(?:424a53|0550ae|0969da)[^"]*"/>')


def test_the_band_is_drawn_in_the_scatter(tmp_path: Path) -> None:
    # The PNGs are left out of both pages: under load Chromium once took its screenshot
    # before the overlays at the bottom were painted, and this test is about the SVG only.
    page = without_pngs(render_html(_banded_report(2, 2)))
    svg = page[page.index("<svg") : page.index("</svg>")]
    # The floor line, two reference lines, the range, and their legend keys.
    assert len(BAND_PATH.findall(svg)) == 3 + 1 + 4
    assert "random floor" in svg and "ref1 (reference)" in svg  # the legend, as SVG text
    full = tmp_path / "full.html"
    full.write_text(page, encoding="utf-8")
    bare = tmp_path / "bare.html"
    bare.write_text(BAND_PATH.sub("", page), encoding="utf-8")
    size = (1300, 3400)
    drawn = screenshot(full, tmp_path / "full.png", tmp_path / "profile-1", size)
    without = screenshot(bare, tmp_path / "bare.png", tmp_path / "profile-2", size)
    changed = np.abs(drawn - without).max(axis=-1) > 40
    # Only the band differs, and it is drawn: three lines across the plot (~500 px each,
    # dashed or dotted) and the shaded range make a thousand and more visible pixels.
    assert changed.sum() > 1000
    rows = np.flatnonzero(changed.any(axis=1))
    assert rows.max() - rows.min() < 700  # all within the one figure


def test_the_same_answer_grids_are_drawn(tmp_path: Path) -> None:
    report = _banded_report(2, 1, faithfulness=False)
    compared = [*report.models, *report.references]
    assert all(len(m.moved) == 2 for m in compared)
    full = tmp_path / "full.html"
    full.write_text(render_html(report), encoding="utf-8")
    for model in compared:
        model.moved = []
    bare = tmp_path / "bare.html"
    bare.write_text(render_html(report), encoding="utf-8")
    size = (1300, 9000)
    drawn = screenshot(full, tmp_path / "full.png", tmp_path / "profile-1", size)
    without = screenshot(bare, tmp_path / "bare.png", tmp_path / "profile-2", size)
    # Each moved sample adds two CAM overlays (random 16x16 maps in jet, ~80x80 px on the
    # page, ~3,300 strongly coloured pixels each): 4 models x 2 samples x 2 overlays.
    added = saturated(drawn) - saturated(without)
    assert added > len(compared) * 2 * 2 * 2000
