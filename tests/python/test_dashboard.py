"""The built-in dashboard in a real browser (Debian's chromium, driven by
Playwright) over `tollgate demo` traffic: every panel renders data, a
filter changes the numbers to what the API returns for it, a consumer key
sees only its own consumer, tables download as CSV, and the console stays
clean. Screenshots are kept with the test artifacts."""

import datetime
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import BIN

playwright = pytest.importorskip("playwright.sync_api")


def chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed (scripts/test.sh installs Debian's)")


class Demo:
    """`tollgate demo` on loopback ports, with fast traffic and a tiny budget
    so alerts fire within seconds."""

    def __init__(self, directory):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.log = open(directory / "demo.log", "wb")
        self.p = subprocess.Popen(
            [BIN, "demo", "--listen", "127.0.0.1:0", "--query-listen", "127.0.0.1:0", "--pg-listen", "127.0.0.1:0",
             "--data", str(directory / "data"), "--interval-ms", "40", "--budget-usd", "0.005"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.query = self.key = self.research = self.admin = None
        for line in self.p.stdout:
            if line.startswith("query API on http://"):
                self.query = line.strip().split("http://")[1]
            if "demo consumer key: " in line:
                self.key = line.split("demo consumer key: ")[1].strip()
            if "research-bot key (team research): " in line:
                self.research = line.split("(team research): ")[1].strip()
            if "admin token " in line:
                self.admin = line.split("admin token ")[1].split(",")[0].strip()
            if line.startswith("requested "):
                break
        else:
            raise RuntimeError("the demo exited early")
        assert self.query and self.key and self.research and self.admin
        threading.Thread(target=self.p.stdout.read, daemon=True).start()

    def api(self, path, token=None, body=None):
        req = urllib.request.Request(f"http://{self.query}{path}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token or self.admin}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def sql(self, query, token=None):
        return self.api("/v1/sql", token, {"query": query})

    def stop(self):
        self.p.kill()
        self.p.wait()


@pytest.fixture(scope="module")
def demo(artifacts):
    d = Demo(artifacts / "dashboard")
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            rows = d.sql("SELECT count(*) AS n, sum(CASE WHEN rate_limited THEN 1 ELSE 0 END) AS limited, "
                         "count(DISTINCT consumer) AS consumers, sum(CASE WHEN fallback THEN 1 ELSE 0 END) AS fell "
                         "FROM usage")[0]
            alerts = d.api("/v1/alerts")["data"]
            if rows["n"] >= 60 and rows["limited"] and rows["consumers"] == 2 and rows["fell"] and alerts:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the demo traffic did not cover every panel: {rows}, {len(alerts)} alerts")
        yield d
    finally:
        d.stop()


@pytest.fixture
def page(artifacts, request):
    shots = artifacts / "dashboard" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 2600}, timezone_id="UTC",
                                      accept_downloads=True)
        pg = context.new_page()
        pg.console = []
        pg.on("console", lambda m: pg.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        pg.on("pageerror", lambda e: pg.console.append(f"pageerror: {e}"))
        yield pg
        pg.screenshot(path=str(shots / f"{request.node.name}.png"), full_page=True)
        browser.close()


def sign_in(page, demo, token):
    page.goto(f"http://{demo.query}/")
    page.fill("#token", token)
    page.click("#signin-form button[type=submit]")
    return rendered(page, 1)


def rendered(page, n):
    page.wait_for_selector(f"body[data-rendered='{n}']", state="attached", timeout=60_000)
    return {el.get_attribute("data-panel"): (el.get_attribute("data-state"), int(el.get_attribute("data-rows") or 0))
            for el in page.query_selector_all("[data-panel]")}


def test_every_panel_renders_the_demo_traffic_without_console_errors(demo, page):
    panels = sign_in(page, demo, demo.admin)
    assert len(panels) == 17
    for name, (state, rows) in panels.items():
        assert state == "ready", f"{name}: {page.inner_text(f'[data-panel={name}]')}"
        assert rows > 0, f"{name} is empty"
    # The charts drew something: ECharts renders into canvases.
    for chart in ["spend-model", "spend-team", "requests", "latency", "tokens-per-s", "fallbacks", "rate-limited"]:
        assert page.query_selector(f"#{chart} canvas"), chart
    assert "demo-r1-daily" in page.inner_text("#budgets")
    assert "Budget demo-r1-daily" in page.inner_text("#alerts")
    # The what-if's self-hosting figures, from the ROI report's `self_host`.
    assert "Break-even output tokens/month" in page.inner_text("#what-if")
    assert page.console == [], page.console
    # The key is held for the session, never put in the address.
    assert demo.admin not in page.url


def test_a_filter_changes_every_number_to_what_the_api_returns(demo, page):
    sign_in(page, demo, demo.admin)
    # A closed window (ending seconds ago, its requests long answered and
    # published), so traffic still arriving cannot move the numbers between
    # the page's queries and ours.
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    start, end = now - datetime.timedelta(hours=1), now - datetime.timedelta(seconds=8)
    time.sleep(3)
    page.select_option("#range", "custom")
    page.fill("#from", start.strftime("%Y-%m-%dT%H:%M:%S"))
    page.fill("#to", end.strftime("%Y-%m-%dT%H:%M:%S"))
    page.select_option("#f-consumer", "research-bot")
    page.click("#controls button[type=submit]")
    panels = rendered(page, 2)
    assert all(s == "ready" for s, _ in panels.values()), panels
    frm, to = page.get_attribute("body", "data-from"), page.get_attribute("body", "data-to")
    assert frm.startswith(start.strftime("%Y-%m-%dT%H:%M:%S")) and to.startswith(end.strftime("%Y-%m-%dT%H:%M:%S"))
    want = demo.sql(f"SELECT count(*) AS n, sum(cost_usd) AS cost FROM usage WHERE consumer = 'research-bot' "
                    f"AND ts_start >= TIMESTAMP '{frm}' AND ts_start < TIMESTAMP '{to}'")[0]
    assert want["n"] > 0
    assert page.get_attribute("#summary", "data-requests") == str(want["n"])
    assert page.get_attribute("#summary", "data-cost-usd") == want["cost"]
    report = demo.api(f"/v1/reports/cost?from={frm}&to={to}&consumer=research-bot&group_by=consumer")
    assert str(report["totals"]["requests"]) == str(want["n"])
    consumers = [td.inner_text() for td in page.query_selector_all("#top-consumers tbody tr td:first-child")]
    assert consumers == ["research-bot"]
    # The CSV holds the table's rows.
    with page.expect_download() as download:
        page.click("#top-consumers .csv")
    text = open(download.value.path()).read().splitlines()
    assert text[0] == "consumer,team,requests,tokens,cost_usd"
    assert text[1].startswith("research-bot,research,") and len(text) == 2
    assert page.console == [], page.console


def test_a_consumer_key_sees_only_its_own_consumer(demo, page):
    panels = sign_in(page, demo, demo.research)
    assert all(s == "ready" for s, _ in panels.values()), panels
    options = [o.inner_text() for o in page.query_selector_all("#f-consumer option")]
    assert options == ["All", "research-bot"]
    consumers = [td.inner_text() for td in page.query_selector_all("#top-consumers tbody tr td:first-child")]
    assert consumers == ["research-bot"]
    assert "demo-app" not in page.inner_text("main")
    # Team demo's budget and its alerts are not research-bot's to see.
    assert "demo-r1-daily" not in page.inner_text("#budgets")
    assert "demo-r1-daily" not in page.inner_text("#alerts")
    mine = demo.sql("SELECT count(*) AS n FROM usage", token=demo.research)[0]["n"]
    assert int(page.get_attribute("#summary", "data-requests")) <= mine
    assert page.console == [], page.console


def test_a_custom_range_that_ends_before_it_starts_is_refused_with_a_message(demo, page):
    sign_in(page, demo, demo.admin)
    page.select_option("#range", "custom")
    page.fill("#from", "2026-01-02T00:00:05")
    page.fill("#to", "2026-01-01T00:00:05")
    page.click("#controls button[type=submit]")
    page.wait_for_selector("#status.error")
    assert "start before it ends" in page.inner_text("#status")
    assert page.get_attribute("body", "data-rendered") == "1", "nothing was reloaded"
    page.fill("#f-tag", "novalue")
    page.select_option("#range", "24")
    page.click("#controls button[type=submit]")
    page.wait_for_selector("#status.error:has-text('key=value')")
    assert page.console == [], page.console


def test_a_wrong_key_is_refused_and_the_page_asks_again(demo, page):
    page.goto(f"http://{demo.query}/")
    page.fill("#token", "tg-not-a-key")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-error:not(:empty)")
    assert page.is_visible("#signin") and not page.is_visible("#app")
    page.console = [c for c in page.console if "401" not in c]
    assert page.console == [], page.console
