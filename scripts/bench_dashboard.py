"""The dashboard at scale: size on disk and time to the list / to a latent in headless Chromium.

    .venv/bin/python scripts/bench_dashboard.py [--sizes 4608 36864 262144] [--out /tmp/lm_saes-bench-dashboard]

For each size, a synthetic analysis (lm_saes.analysis.synthetic; 10 top + 5 sampled examples of 24 tokens shown
per latent, as `lm-saes dashboard` shows by default) is written as a dashboard folder, then opened in Debian's
headless chromium three times: the list (index.html), a far latent (#latent=N at 3/4 of d_sae) and a token
search (#q=...). "list ms" and "open ms" are the page's own marks (performance.now() when the list is drawn,
and from asking for a latent's block to its page drawn); "wall s" is chromium's whole run minus an
about:blank run, i.e. what the page adds. Targets (issue 16): first page < 5 MB, list < 2 s, latent < 1 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lm_saes.analysis.dashboard import DashboardConfig, write_dashboard
from lm_saes.analysis.synthetic import synthetic_analysis

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--window-size=1200,900", "--virtual-time-budget=5000"]


def chromium_dom(url: str, profile: Path) -> tuple[float, str]:
    """(wall seconds, the DOM after scripts ran) of one headless chromium run on `url`."""
    started = time.perf_counter()
    out = subprocess.run([shutil.which("chromium") or "/usr/bin/chromium", *FLAGS, f"--user-data-dir={profile}",
                          "--dump-dom", url], capture_output=True, text=True, timeout=300)
    return time.perf_counter() - started, out.stdout


def mark(dom: str, name: str) -> str:
    m = re.search(rf'data-{name}="(\d+)"', dom)
    return m.group(1) if m else "-"


def bench_size(d_sae: int, out: Path, profile: Path, blank_s: float) -> list[str]:
    info, tensors = synthetic_analysis(d_sae, n_top=10, n_quantile=5, window_before=15, window_after=8)
    started = time.perf_counter()
    page = write_dashboard(info, tensors, out / f"d{d_sae}", DashboardConfig())
    write_s = time.perf_counter() - started
    folder = page.parent
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    first = page.stat().st_size + (folder / "index.js").stat().st_size
    list_s, list_dom = chromium_dom(page.as_uri(), profile)
    far = d_sae * 3 // 4 // 7 * 7  # a live latent (the synthetic analysis kills every 7th, from 6)
    open_s, open_dom = chromium_dom(page.as_uri() + f"#latent={far}", profile)
    word = info["token_strings"][str(int(tensors["top_tokens"][far, 1, 15]))].strip()
    search_s, search_dom = chromium_dom(page.as_uri() + f"#q={word}", profile)
    assert f"Latent {far}</h2>" in open_dom and 'data-latent="' in search_dom, "the page did not work"
    found = re.search(r'id="count">([\d,]+) of', search_dom)
    return [f"{d_sae:,}", f"{write_s:.1f}", f"{first / 1e6:.2f}", f"{total / 1e6:.0f}", f"{total / d_sae:,.0f}",
            mark(list_dom, "list-ms"), f"{list_s - blank_s:.2f}", mark(open_dom, "open-ms"), f"{open_s - blank_s:.2f}",
            f"{search_s - blank_s:.2f} ({found.group(1) if found else '?'} for {word!r})"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4608, 36864, 262144])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lm_saes-bench-dashboard")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    profile = args.out / "chromium-profile"
    chromium_dom("about:blank", profile)  # the first run creates the profile
    blank_s = min(chromium_dom("about:blank", profile)[0] for _ in range(2))
    table = Table(title=f"lm-saes dashboard on synthetic analyses ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores; chromium about:blank {blank_s:.2f} s subtracted)")
    for column in ("latents", "write s", "first page MB", "total MB", "bytes/latent", "list ms", "list wall s",
                   "open ms", "open wall s", "search wall s (found)"):
        table.add_column(column, justify="right")
    for d_sae in args.sizes:
        table.add_row(*bench_size(d_sae, args.out, profile, blank_s))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
