"""The built-in dashboard's first full render, and the alerts' evaluation
cost, over a generated lake (BENCH_EVENTS=10000000 over BENCH_DAYS=30, the
query benchmark's lake, cached under ~/.cache/tollgate/bench-lake).

Render: headless Chromium (Debian's, through Playwright) signs in with the
admin token and waits until every panel has its data; the page reports how
long that took from sign-in (`data-render-ms`). Measured for a fresh
service (its Parquet footer cache cold), then BENCH_RUNS more fresh pages,
for the default range (last 24 hours) and for the whole 30 days.

Alerts: `tollgate query` with a monthly budget and [alerts] evaluates every
2 s; /metrics gives the first evaluation (the month's hours summed from the
lake) and the steady ones (listing the lake, nothing changed), side by
side with the evaluation turned off (no budget: the index still covers the
anomaly window)."""

import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench import machine
from bench_query import BUILD, DAYS, EVENTS, LAKE, free_port, generate
from benchmd import write_section

BIN = sys.argv[1]
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
TOKEN = "bench-admin-token"
SLOWEST = {}


def start(budget):
    port = free_port()
    d = pathlib.Path(tempfile.mkdtemp())
    rules = ""
    if budget:
        rules = '[[budgets]]\nname = "everything"\nusd = "500000"\nperiod = "month"\nalert_at = [0.5, 0.8]\n'
    (d / "query.toml").write_text(f"""
[pipeline]
lake = "{LAKE}"

[query]
listen = "127.0.0.1:{port}"
pg_listen = "off"
admin_token = "{TOKEN}"

{rules}
[alerts]
outbox_dir = "{d / "outbox"}"
""")
    p = subprocess.Popen([BIN, "query", "--config", str(d / "query.toml")], stdout=subprocess.DEVNULL,
                         stderr=open(d / "query.log", "wb"))
    addr = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://{addr}/healthz", timeout=1).read()
            return p, addr
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the query service did not start")


def metrics(addr):
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) if re.search(rf"^{name} ", text, re.M) else 0.0
    return get("tollgate_alerts_evaluation_duration_seconds_count"), get("tollgate_alerts_evaluation_duration_seconds_sum")


def evaluation(budget):
    p, addr = start(budget)
    try:
        deadline = time.time() + 300
        while metrics(addr)[0] < 1 and time.time() < deadline:
            time.sleep(0.1)
        n1, s1 = metrics(addr)
        time.sleep(12)
        n2, s2 = metrics(addr)
        steady = (s2 - s1) / max(1, n2 - n1)
        return s1 / max(1, n1), steady
    finally:
        p.kill()
        p.wait()


def render(addr, hours, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 2600})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://{addr}/")
    page.fill("#token", TOKEN)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("body[data-rendered='1']", state="attached", timeout=120_000)
    ms = int(page.get_attribute("body", "data-render-ms"))
    if hours != 24:
        page.select_option("#range", str(hours))
        page.click("#controls button[type=submit]")
        page.wait_for_selector("body[data-rendered='2']", state="attached", timeout=120_000)
        ms = int(page.get_attribute("body", "data-render-ms"))
    panels = page.query_selector_all("[data-panel]")
    states = [el.get_attribute("data-state") for el in panels]
    slowest = sorted(((int(el.get_attribute("data-ms") or 0), el.get_attribute("data-panel")) for el in panels),
                     reverse=True)[:3]
    page.close()
    if errors or any(s != "ready" for s in states):
        raise RuntimeError(f"the dashboard did not render: {errors} {states}")
    SLOWEST[hours] = slowest
    return ms


def main():
    took = generate()
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    results = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for hours in (24, 24 * DAYS):
            p, addr = start(False)
            try:
                first = render(addr, hours, browser)
                warm = [render(addr, hours, browser) for _ in range(RUNS)]
            finally:
                p.kill()
                p.wait()
            results[hours] = (first, statistics.median(warm), min(warm), max(warm))
            print(f"render {hours} h: first {first} ms, then median {results[hours][1]} ms", flush=True)
        browser.close()
    off_first, off_steady = evaluation(False)
    on_first, on_steady = evaluation(True)
    print(f"alerts: first {on_first:.3f} s / {off_first:.3f} s, steady {on_steady * 1000:.1f} / {off_steady * 1000:.1f} ms",
          flush=True)
    per_day = {h: int(EVENTS / DAYS * h / 24) for h in results}
    body = [
        f"A lake of {EVENTS:,} events over {DAYS} days from `tollgate gen-lake` (generated in {took:.0f} s, cached), "
        f"`tollgate query` ({BUILD} build, its default 2 threads, 4 concurrent queries), Debian's chromium "
        f"headless through Playwright on the same machine. {machine()}",
        "",
        "Dashboard first full render: from sign-in until all 17 panels hold their data (the page's own "
        "`data-render-ms`; about 20 API calls, at most 3 at a time). *First* is a fresh service (Parquet footer "
        f"cache cold); *then* is the median (min-max) of {RUNS} fresh pages after it.",
        "",
        "| range | events in range | first | then | slowest panels (last page) |",
        "|---|---:|---:|---:|---|",
    ]
    for hours, (first, med, lo, hi) in results.items():
        label = "last 24 hours (default)" if hours == 24 else f"last {hours // 24} days"
        slow = ", ".join(f"{name} {ms:,} ms" for ms, name in SLOWEST[hours])
        body.append(f"| {label} | {per_day[hours]:,} | {first:,} ms | {med:,.0f} ms ({lo:,}-{hi:,}) | {slow} |")
    body += [
        "",
        "Alert evaluation, one tick (every 2 s by default): the first sums each hour of the budget's month and the "
        "anomaly window from the lake; later ticks list the lake and sum only hours whose files changed (none "
        "here), then run the rules. *Off*: no budget, so the ledger index only covers the anomaly window.",
        "",
        "| | first tick | steady tick | CPU share at one tick per 2 s |",
        "|---|---:|---:|---:|",
        f"| monthly budget | {on_first * 1000:.0f} ms | {on_steady * 1000:.1f} ms | {on_steady / 2 * 100:.2f}% of a core |",
        f"| off (no budget) | {off_first * 1000:.0f} ms | {off_steady * 1000:.1f} ms | {off_steady / 2 * 100:.2f}% of a core |",
    ]
    write_section("Dashboard and alerts", "\n".join(body))


if __name__ == "__main__":
    main()
