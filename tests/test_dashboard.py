"""The dashboard: a folder of local scripts (or one self-contained file), working in a real headless Chromium.

The browser tests need Debian's chromium (`scripts/install.sh --test` installs it). Where it is missing they
fail in CI (env CI set) and skip, saying why, elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from lm_saes.analysis import AnalysisConfig, FeatureAnalyzer, save_analysis
from lm_saes.analysis.dashboard import DashboardConfig, write_dashboard
from lm_saes.analysis.dashboard_data import fnv1a
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


@pytest.fixture(scope="module")
def single_page(analysed_run) -> Path:
    return dashboard_run(DashboardSettings(run_dir=str(analysed_run), dashboard=DashboardConfig(single_file=True)))


OFFLINE = r"""https?://|@import|fetch\(|XMLHttpRequest|href\s*=\s*"(?!#)"""


def test_the_folder_loads_only_local_scripts(page) -> None:
    folder = page.parent
    assert page.name == "index.html" and folder.name == "dashboard"
    html = page.read_text()
    assert re.findall(r'src\s*=\s*"([^"]*)"', html) == ["index.js"] and not re.search(OFFLINE, html)
    assert sorted(p.name for p in (folder / "blocks").iterdir()) == ["00000.js"]  # d_sae 64 < one block of 256
    assert (folder / "index.js").read_text().startswith("LM_SAES.index({")
    # The planted tokens are searchable: `cat` (stripped, lower-cased) is in the shard its hash names.
    (shard_file,) = (folder / "search").iterdir()  # 2 live latents: one shard
    assert shard_file.name == f"{fnv1a('cat') % 1:04d}.js"
    shard = json.loads(shard_file.read_text().removeprefix("LM_SAES.search(0,").removesuffix(");\n"))
    assert DETECTOR in shard["cat"] and ANTI in shard["dog"]  # the tokens at their peaks


def test_the_single_file_is_self_contained(single_page) -> None:
    html = single_page.read_text()
    assert single_page.name == "dashboard.html"
    assert not re.search(r"<\w+[^>]*\ssrc\s*=", html) and not re.search(OFFLINE, html)  # no tag loads a file
    assert html.count("<script>LM_SAES.block(") == 1 and html.count("<script>LM_SAES.index(") == 1  # inline data
    assert "</script" not in html.split("LM_SAES.index({")[-1].split("</script>")[0]


def test_an_unknown_format_version_is_refused(analysed_run, tmp_path) -> None:
    from lm_saes.errors import UserInputError

    shutil.copytree(analysed_run / "analysis", tmp_path / "analysis")
    info_path = tmp_path / "analysis" / "analysis.json"
    info_path.write_text(info_path.read_text().replace('"format_version": 1', '"format_version": 2'))
    with pytest.raises(UserInputError, match="format_version 2; this lm_saes reads version 1"):
        dashboard_run(DashboardSettings(run_dir=str(tmp_path)))


def test_writing_is_deterministic_and_limits_examples(analysed_run, tmp_path) -> None:
    info, tensors = load_analysis(analysed_run)

    def files(out: Path, cfg: DashboardConfig) -> dict[str, bytes]:
        write_dashboard(info, tensors, out, cfg)
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first = files(tmp_path / "a", DashboardConfig(n_top_examples=3, n_quantile_examples=2))
    assert first == files(tmp_path / "a", DashboardConfig(n_top_examples=3, n_quantile_examples=2))  # replaced whole
    small = files(tmp_path / "b", DashboardConfig(n_top_examples=1, n_quantile_examples=0))
    assert len(small["blocks/00000.js"]) < len(first["blocks/00000.js"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


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


@pytest.mark.parametrize("which", ["page", "single_page"])
def test_the_page_opens_a_latent_in_headless_chromium(which, request, tmp_path) -> None:
    url = request.getfixturevalue(which).resolve().as_uri() + f"#latent={DETECTOR}"
    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # The list was built by the script: one row per live latent (the detector and the anti-detector).
    rows = re.findall(r'<div class="row grid[^"]*" data-latent="(\d+)"', html)
    assert sorted(map(int, rows)) == sorted([DETECTOR, ANTI])
    assert re.search(rf'<div class="row grid selected" data-latent="{DETECTOR}"', html)
    # The fragment opened the detector: its top examples shade `cat` at the peak, with the value on hover.
    assert re.search(rf'id="detail" data-latent="{DETECTOR}"', html) and f"Latent {DETECTOR}</h2>" in html
    top = html.split('id="top-examples"')[1].split('id="quantile-examples"')[0]
    assert re.search(r'<span class="tok peak" style="background:rgba\(255,128,0,1\.00\)" title="1">cat</span>', top)
    assert html.count('<div class="example">') >= 2 and "<svg class=\"hist\"" in html
    assert re.search(r'<td class="pos">cat</td>', html)  # the logit table

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / f"dashboard-{which}.png"
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


# --- at scale: 262,144 synthetic latents ----------------------------------------------------------------------

FAR, ZEBRA = 200_000, 10**6
"""A far latent, and a token id outside the synthetic vocabulary that only FAR's third top example peaks on."""


@pytest.fixture(scope="module")
def big_dashboard(tmp_path_factory) -> Path:
    from lm_saes.analysis.synthetic import synthetic_analysis

    info, tensors = synthetic_analysis(2**18)
    before = info["window_before"]
    tensors["top_tokens"][FAR, 2, before] = ZEBRA  # not FAR's top token: only the search shard can find it
    info["token_strings"][str(ZEBRA)] = " Zebra"
    return write_dashboard(info, tensors, tmp_path_factory.mktemp("big") / "dashboard", DashboardConfig())


@pytest.mark.slow
def test_a_262k_latent_dashboard_lists_opens_a_far_latent_and_searches(big_dashboard, tmp_path) -> None:
    folder = big_dashboard.parent
    first_page = big_dashboard.stat().st_size + (folder / "index.js").stat().st_size
    assert first_page < 5 * 2**20 and len(list((folder / "blocks").iterdir())) == 2**18 // 256
    live = 2**18 - 2**18 // 7  # the synthetic analysis kills every 7th latent

    html = run_chromium(tmp_path, "--dump-dom", big_dashboard.as_uri() + f"#latent={FAR}").stdout
    assert f"{live:,} of {live:,} live latents shown" in html
    assert len(re.findall(r'<div class="row grid[^"]*" data-latent="\d+"', html)) >= 20  # the list, virtual
    assert re.search(rf'<div class="row grid selected" data-latent="{FAR}"', html)  # scrolled to the far latent
    detail = html.split('id="detail"')[1].split("</section>")[0]
    assert f"Latent {FAR}</h2>" in detail and detail.count('<div class="example">') == 5 + 2
    assert re.search(r'<span class="tok peak"[^>]*> Zebra</span>', detail)
    assert re.search(r'<a href="#latent=\d+">', detail)  # its neighbours link to their pages

    html = run_chromium(tmp_path, "--dump-dom", big_dashboard.as_uri() + "#q=zebra").stdout
    assert f"1 of {live:,} live latents shown" in html
    assert re.findall(r'<div class="row grid[^"]*" data-latent="(\d+)"', html) == [str(FAR)]
