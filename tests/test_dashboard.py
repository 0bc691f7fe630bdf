"""The dashboard page: self-contained, compact, and working in a real headless Chromium.

The browser tests need Debian's chromium (`scripts/install.sh --test` installs it). Where it is missing they
fail in CI (env CI set) and skip, saying why, elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from lm_saes.analysis import AnalysisConfig, FeatureAnalyzer, save_analysis
from lm_saes.analysis.dashboard import render_dashboard
from lm_saes.analysis.files import load_analysis
from lm_saes.runners.dashboard import DashboardSettings, dashboard_run
from tests.test_analyzer import ANTI, DETECTOR, detector_sae

SCREENSHOT_DIR = Path(os.environ.get("LM_SAES_SCREENSHOT_DIR", "/tmp/lm_saes-dashboard-test"))
"""Where the browser test leaves its screenshot, for people to look at."""


@pytest.fixture(scope="module")
def analysed_run(tiny_model, tmp_path_factory) -> Path:
    from lm_saes.activation.packing import pack_documents
    from tests.conftest import synthetic_documents

    run_dir = tmp_path_factory.mktemp("dashboard")
    contexts = list(pack_documents(synthetic_documents(120, seed=5), tiny_model.tokenizer, 24))
    sae, _, _ = detector_sae(tiny_model)
    result = FeatureAnalyzer(AnalysisConfig(model_batch_size=8, window_before=4, window_after=3)).analyze(
        sae, tiny_model, contexts)
    save_analysis(result, run_dir, tiny_model.tokenizer)
    return run_dir


@pytest.fixture(scope="module")
def page(analysed_run) -> Path:
    return dashboard_run(DashboardSettings(run_dir=str(analysed_run)))


def test_the_page_is_self_contained(page) -> None:
    html = page.read_text()
    assert page.name == "dashboard.html"
    assert not re.search(r"""(src|href)\s*=|https?://|@import|fetch\(|XMLHttpRequest""", html)
    assert html.count("<script") == 2 and '<script type="application/json" id="data">' in html
    # Only the live latents travel; the dead ones are listed by id.
    data = re.search(r'id="data">(.*?)</script>', html, re.S).group(1)  # type: ignore[union-attr]
    assert data.count("</") == 0 and f"[{DETECTOR}," in data and f"[{ANTI}," in data


def test_an_unknown_format_version_is_refused(analysed_run, tmp_path) -> None:
    from lm_saes.errors import UserInputError

    shutil.copytree(analysed_run / "analysis", tmp_path / "analysis")
    info_path = tmp_path / "analysis" / "analysis.json"
    info_path.write_text(info_path.read_text().replace('"format_version": 1', '"format_version": 2'))
    with pytest.raises(UserInputError, match="format_version 2; this lm_saes reads version 1"):
        dashboard_run(DashboardSettings(run_dir=str(tmp_path)))


def test_rendering_is_deterministic_and_limits_examples(analysed_run) -> None:
    info, tensors = load_analysis(analysed_run)
    assert render_dashboard(info, tensors, 3, 2) == render_dashboard(info, tensors, 3, 2)
    assert len(render_dashboard(info, tensors, 1, 0)) < len(render_dashboard(info, tensors, 10, 5))


# --- in a real browser -------------------------------------------------------------------------------------

def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "chromium is not installed (apt-get install -y chromium; scripts/install.sh --test does it)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: the browser test must run in CI")
    pytest.skip(message)


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1200,900", "--virtual-time-budget=5000",
    ]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of raw pixel bytes) of an 8-bit RGB/RGBA PNG, with the standard library."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(blob):
        (length,), kind = struct.unpack(">I", blob[pos : pos + 4]), blob[pos + 4 : pos + 8]
        body = blob[pos + 8 : pos + 8 + length]
        header, idat = (body, idat) if kind == b"IHDR" else (header, idat + body if kind == b"IDAT" else idat)
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):  # undo the PNG filter of this row
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def test_the_page_opens_a_latent_in_headless_chromium(page, tiny_model, tmp_path) -> None:
    url = page.resolve().as_uri() + f"#latent={DETECTOR}"
    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # The list was built by the script: one row per live latent (the detector and the anti-detector).
    rows = re.findall(r'<tr class="row[^"]*" data-latent="(\d+)"', html)
    assert sorted(map(int, rows)) == sorted([DETECTOR, ANTI])
    assert re.search(rf'<tr class="row selected" data-latent="{DETECTOR}"', html)
    # The fragment opened the detector: its top examples shade `cat` at the peak, with the value on hover.
    assert f'id="detail" data-latent="{DETECTOR}"' in html and f"Latent {DETECTOR}</h2>" in html
    top = html.split('id="top-examples"')[1].split('id="quantile-examples"')[0]
    assert re.search(r'<span class="tok peak" style="background:rgba\(255,128,0,1\.00\)" title="1">cat</span>', top)
    assert html.count('<div class="example">') >= 2 and "<svg class=\"hist\"" in html
    assert re.search(r'<td class="pos">cat</td>', html)  # the logit table

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "dashboard.png"
    shot.unlink(missing_ok=True)
    result = run_chromium(tmp_path, f"--screenshot={shot}", url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, rows_px = png_pixels(shot)
    assert (width, height) == (1200, 900)
    distinct_rows = set(rows_px)
    distinct_bytes = set().union(*(set(r) for r in rows_px[::9]))
    assert len(distinct_rows) > 50 and len(distinct_bytes) > 50, "the screenshot is (nearly) blank"
    # The peak token's orange (255, 128, 0) shading is on screen: the latent really was opened.
    bpp = len(rows_px[0]) // width
    assert any(r[i : i + 3] == b"\xff\x80\x00" for r in rows_px for i in range(0, len(r), bpp))
    print(f"screenshot: {shot}")
