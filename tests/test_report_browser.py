"""The HTML report in a real browser: headless Chromium, with the network blocked, draws
the inline CSS, the inline SVG scatter and every inline PNG.

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
from tests.test_report import _fake_report


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "headless Chromium is needed: apt-get install -y chromium"
        if os.environ.get("SP2PS_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def screenshot(page: Path, out: Path, profile: Path) -> np.ndarray:
    import imageio.v3 as iio

    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # No network at all: a page that needed one would show holes.
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         f"--user-data-dir={profile}", "--hide-scrollbars", f"--screenshot={out}",
         "--window-size=1300,2600", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    return iio.imread(out)[..., :3].astype(np.int32)


def saturated(image: np.ndarray) -> int:
    """Pixels of strong colour (CAM overlays, plot markers), not greys or the page's tints."""
    return int(((image.max(axis=-1) - image.min(axis=-1)) > 120).sum())


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = render_html(_fake_report())
    full = tmp_path / "report.html"
    full.write_text(page, encoding="utf-8")
    # The same page with every image and the SVG removed: what a page whose pictures failed
    # to load would look like.
    bare = tmp_path / "bare.html"
    stripped = re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page)
    stripped = re.sub(r"<svg.*?</svg>", "", stripped, flags=re.S)
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
