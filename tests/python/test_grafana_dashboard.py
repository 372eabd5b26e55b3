"""The Grafana dashboard (dashboards/grafana/tollgate.json) against the
PostgreSQL endpoint. Every panel's SQL is expanded as Grafana expands it
(template variables in the browser, then `$__interval` and the PostgreSQL
data source's macros in the backend) and sent in the simple query protocol,
as Grafana's data source sends it, with the variables at All and at single
values, over time ranges around the test traffic and ending inside it.
Panel numbers are checked against DuckDB reading the same lake files; a
second gateway with teams, a rate limit, a budget and alerts fills the
budgets, alerts and rate-limit panels."""

import datetime
import decimal
import json
import pathlib
import re
import shutil
import urllib.error
import urllib.request

import duckdb
import psycopg
import pytest

import test_limits
from conftest import ADMIN_TOKEN, KEY, LIMITED_KEY
from test_bi_clients import lake
from test_query import pg, traffic  # noqa: F401  (traffic is a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "grafana" / "tollgate.json"
PROVISIONING = ROOT / "dashboards" / "grafana" / "provisioning"
DS = {"type": "grafana-postgresql-datasource", "uid": "${DS_TOLLGATE}"}
ALL = "$__all"

# Panels the session traffic (two consumers, answers, fallbacks, a refusal)
# must fill when every variable is at All.
FILLED = ["Spend", "Requests", "Tokens", "Error rate", "Spend by model", "Spend by team", "Tokens by kind",
          "Requests by outcome", "Latency and time to first token", "Error rate by model",
          "Cache hit rate and money saved", "Fallbacks by reason", "Top consumers"]
# Panels that read the budgets and alerts tables or refusals: the session
# gateway has no rules, so they may be empty there.
RULES = ["Budgets", "Recent alerts", "Rate-limited requests"]


# --- Grafana's expansion, step by step ----------------------------------------------------------------------------

def quote_literal(value):
    """The PostgreSQL query model's quoteLiteral."""
    return "'" + str(value).replace("'", "''") + "'"


# TemplateSrv's variable syntaxes: $name, [[name]], [[name:fmt]], ${name}, ${name.path}, ${name:fmt}.
VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")


def format_interval(seconds):
    """gtime.FormatInterval: the largest whole unit."""
    ms = round(seconds * 1000)
    for unit, size in [("y", 365 * 86400000), ("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000),
                       ("ms", 1)]:
        if ms >= size:
            return f"{ms // size}{unit}"
    return "1ms"


def interpolate_variables(sql, dashboard, selected, interval):
    """What the browser sends: `templateSrv.replace(rawSql, scopedVars,
    interpolateVariable)`. `selected` maps a variable to ALL or a list of
    values; `options` are what its query returned (All without a custom all
    value means all of them). `$__interval` comes from the request's scoped
    variables, unquoted."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    scoped = {"__interval": format_interval(interval), "__interval_ms": str(round(interval * 1000))}

    def one(m):
        name = m.group(1) or m.group(2) or m.group(4)
        if name in scoped:
            return scoped[name]
        if name not in selected:
            return m.group(0)
        var, value = variables[name], selected[name]
        if value == ALL:
            if var.get("allValue"):
                # A custom all value goes in as written.
                return var["allValue"]
            value = var["_options"]
        if isinstance(value, str):
            return quote_literal(value) if var.get("multi") or var.get("includeAll") else value.replace("'", "''")
        return ",".join(quote_literal(v) for v in value)

    return VARIABLE.sub(one, sql)


def go_float(x):
    """Go's %v of a float64 (strconv 'g', shortest): an exponent from 1e+06."""
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    d = decimal.Decimal(repr(x))
    exponent = d.adjusted()
    if exponent < -4 or exponent >= 6:
        mantissa = str(d.scaleb(-exponent).normalize())
        return f"{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    return repr(x)


def parse_interval(text):
    """gtime.ParseInterval for the units dashboards use."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", text)
    assert m, f"an interval Grafana parses: {text!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def rfc3339nano(t):
    """time.RFC3339Nano in UTC: no trailing zeros in the fraction, none at all for whole seconds."""
    t = t.astimezone(datetime.timezone.utc)
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")


def expand_macros(sql, start, end, interval):
    """What the backend runs: sqleng.Interpolate (`$__interval_ms`,
    `$__interval`, `$__unixEpochFrom()`, `$__unixEpochTo()`), then the
    PostgreSQL macro engine (macros.go) without TimescaleDB."""
    sql = sql.replace("$__interval_ms", str(round(interval * 1000)))
    sql = sql.replace("$__interval", format_interval(interval))
    sql = sql.replace("$__unixEpochFrom()", str(int(start.timestamp())))
    sql = sql.replace("$__unixEpochTo()", str(int(end.timestamp())))
    original = sql

    def evaluate(name, args):
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name == "__timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{rfc3339nano(start)}' AND '{rfc3339nano(end)}'"
        if name == "__timeFrom":
            return f"'{rfc3339nano(start)}'"
        if name == "__timeTo":
            return f"'{rfc3339nano(end)}'"
        if name == "__timeGroup":
            seconds = go_float(parse_interval(args[1].strip("'")))
            return f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"
        if name == "__timeGroupAlias":
            return evaluate("__timeGroup", args) + ' AS "time"'
        if name == "__unixEpochFilter":
            return f"{args[0]} >= {int(start.timestamp())} AND {args[0]} <= {int(end.timestamp())}"
        if name == "__unixEpochGroup":
            seconds = go_float(parse_interval(args[1].strip("'")))
            return f"floor(({args[0]})/{seconds})*{seconds}"
        if name == "__unixEpochGroupAlias":
            return evaluate("__unixEpochGroup", args) + ' AS "time"'
        raise AssertionError(f"unknown macro {name!r}")

    def one(m):
        name = m.group(1)
        if name == "__timeGroup":
            # Pre-5.3 compatibility: followed by a comma, it is the alias form.
            i = original.find(m.group(0))
            if i >= 0 and original[i + len(m.group(0)):i + len(m.group(0)) + 1] == ",":
                name = "__timeGroupAlias"
        return evaluate(name, [a.strip(" ") for a in m.group(2).split(",")])

    return MACRO.sub(one, sql)


def grafana_sql(raw, dashboard, selected, start, end, interval):
    return expand_macros(interpolate_variables(raw, dashboard, selected, interval), start, end, interval)


def test_the_expansion_matches_grafanas_own_examples():
    """The expansions above against the outputs macros_test.go and the
    SQL data source's interpolateVariable document."""
    start = datetime.datetime(2018, 4, 12, 18, 0, tzinfo=datetime.timezone.utc)
    end = start + datetime.timedelta(minutes=5)
    assert expand_macros("WHERE $__timeFilter(time_column)", start, end, 60) == \
        "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"
    assert expand_macros("GROUP BY $__timeGroup(time_column,'5m')", start, end, 60) == \
        "GROUP BY floor(extract(epoch from time_column)/300)*300"
    assert expand_macros("SELECT $__timeGroup(time_column,'5m'), x", start, end, 60) == \
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", x'
    assert expand_macros("$__timeGroupAlias(time_column, $__interval)", start, end, 3600) == \
        'floor(extract(epoch from time_column)/3600)*3600 AS "time"'
    assert expand_macros("$__timeGroup(t, 200ms)", start, end, 60) == "floor(extract(epoch from t)/0.2)*0.2"
    assert expand_macros("$__timeGroup(t, 30d)", start, end, 60) == "floor(extract(epoch from t)/2.592e+06)*2.592e+06"
    assert expand_macros("select $__timeFrom(), $__timeTo(), $__unixEpochFrom()", start, end, 60) == \
        "select '2018-04-12T18:00:00Z', '2018-04-12T18:05:00Z', 1523556000"
    ms = start + datetime.timedelta(milliseconds=120)
    assert expand_macros("$__timeFrom()", ms, end, 60) == "'2018-04-12T18:00:00.12Z'"
    board = {"templating": {"list": [
        {"name": "a", "multi": True, "includeAll": True, "_options": ["x", "o'k"]},
        {"name": "b", "multi": True, "includeAll": True, "allValue": "'__all'"},
        {"name": "c", "multi": False, "includeAll": False},
    ]}}
    sel = {"a": ALL, "b": ALL, "c": "it's"}
    assert interpolate_variables("a IN ($a) AND [[b]] = ${b} AND c = '$c'", board, sel, 60) == \
        "a IN ('x','o''k') AND '__all' = '__all' AND c = 'it''s'"
    sel = {"a": ["o'k"], "b": ["p", "q"], "c": "z"}
    assert interpolate_variables("$a $b $__interval $__interval_ms $__timeFilter(x)", board, sel, 300) == \
        "'o''k' 'p','q' 5m 300000 $__timeFilter(x)"


# --- the file ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def targets(dashboard):
    """(title, format, rawSql) of every panel target."""
    return [(p["title"], t.get("format"), t["rawSql"]) for p in dashboard["panels"] for t in p["targets"]]


def query_variables(dashboard):
    return [v for v in dashboard["templating"]["list"] if v["type"] == "query"]


def test_the_dashboard_is_an_importable_grafana_dashboard_over_the_placeholder_data_source(dashboard):
    assert dashboard["schemaVersion"] == 39 and dashboard["uid"] and dashboard["title"]
    assert dashboard["id"] is None
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_TOLLGATE"]["type"] == "datasource"
    assert inputs["DS_TOLLGATE"]["pluginId"] == "grafana-postgresql-datasource"
    required = {(r["type"], r["id"]) for r in dashboard["__requires"]}
    assert ("datasource", "grafana-postgresql-datasource") in required
    assert {("panel", p["type"]) for p in dashboard["panels"]} <= required

    panels = dashboard["panels"]
    titles = [p["title"] for p in panels]
    assert len(set(titles)) == len(titles) and set(FILLED + RULES) <= set(titles), titles
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, p["title"]
            assert t["rawQuery"] is True and t["editorMode"] == "code" and t["rawSql"].strip(), p["title"]
            assert t["format"] == ("time_series" if p["type"] == "timeseries" else "table"), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine

    for title, fmt, sql in targets(dashboard):
        if re.search(r"\bFROM usage\b", sql):
            # Every usage panel follows the dashboard's time range and variables.
            for part in ["$__timeFilter(ts_start)", "$__timeFrom()::date", "$__timeTo()::date",
                         "('__all' IN ($consumer) OR consumer IN ($consumer))",
                         "('__all' IN ($team) OR team IN ($team))",
                         "('__all' IN ($model) OR coalesce(served_model, requested_model) IN ($model))"]:
                assert part in sql, (title, part)
        if fmt == "time_series":
            assert "$__timeGroupAlias(ts_start, $__interval)" in sql and sql.rstrip().endswith("ORDER BY 1"), title
    alerts = next(p for p in panels if p["title"] == "Recent alerts")["targets"][0]["rawSql"]
    assert re.search(r"SELECT\s+id,\s+fired_at,\s+kind,\s+status,\s+name,\s+message\s+FROM alerts", alerts)
    budgets = next(p for p in panels if p["title"] == "Budgets")
    assert all(c in budgets["targets"][0]["rawSql"] for c in ["spent_usd", "usd", "spent_fraction", "FROM budgets"])
    gauge = [o for o in budgets["fieldConfig"]["overrides"] if o["matcher"]["options"] == "spent_fraction"][0]
    assert {"id": "custom.cellOptions", "value": {"type": "gauge", "mode": "gradient", "valueDisplayMode": "text"}} \
        in gauge["properties"]

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_TOLLGATE"]["type"] == "datasource"
    assert variables["DS_TOLLGATE"]["query"] == "grafana-postgresql-datasource"
    for name in ["consumer", "team", "model"]:
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == DS
        assert v["multi"] and v["includeAll"] and v["allValue"] == "'__all'" and v["refresh"] == 2
        assert v["query"] == v["definition"] and "FROM usage" in v["query"] and "$__timeFilter(ts_start)" in v["query"]
    for a in dashboard["annotations"]["list"]:
        if not a.get("builtIn"):
            assert a["datasource"] == DS and a["target"]["rawSql"].strip()


def test_the_provisioning_examples_point_at_the_endpoint_and_the_dashboard():
    yaml = pytest.importorskip("yaml")
    ds = yaml.safe_load((PROVISIONING / "datasources" / "tollgate.yaml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "grafana-postgresql-datasource" and source["url"] == "127.0.0.1:5433"
    assert source["user"] == "admin" and source["jsonData"]["database"] == "tollgate"
    assert source["jsonData"]["sslmode"] == "disable"
    assert re.fullmatch(r"\$\{?\w+\}?", source["secureJsonData"]["password"]), "the password comes from the environment"
    boards = yaml.safe_load((PROVISIONING / "dashboards" / "tollgate.yaml").read_text())
    [provider] = boards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# --- against the session gateway ----------------------------------------------------------------------------------

def span(gateway):
    """Dashboard ranges in whole milliseconds (Grafana's from/to): the last
    six hours up to a minute from now, and one ending at an event in the
    middle of the traffic."""
    ts = [r[0] for r in lake(gateway).execute("SELECT ts_start FROM usage ORDER BY ts_start").fetchall()]
    now = datetime.datetime.now(datetime.timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    mid = ts[len(ts) // 2].astimezone(datetime.timezone.utc)
    mid = mid.replace(microsecond=mid.microsecond // 1000 * 1000)
    return [(now - datetime.timedelta(hours=6, milliseconds=123), now + datetime.timedelta(minutes=1)),
            (now - datetime.timedelta(hours=6, milliseconds=123), mid)]


def run(conn, sql):
    """One statement as Grafana's pgx Exec sends it: the simple query protocol."""
    cur = conn.execute(sql, prepare=False)
    assert cur.description, sql
    return [d.name for d in cur.description], cur.fetchall()


def with_options(dashboard, conn, start, end):
    """Runs each query variable as Grafana refreshes it on a time range
    change and keeps its values as the variable's options."""
    out = {}
    for v in query_variables(dashboard):
        names, rows = run(conn, grafana_sql(v["query"], dashboard, {}, start, end, 60))
        assert len(names) == 1, (v["name"], names)
        v["_options"] = [r[0] for r in rows]
        out[v["name"]] = v["_options"]
    return out


def run_panels(dashboard, conn, selected, start, end, interval):
    results = {}
    failures = []
    for title, fmt, raw in targets(dashboard):
        sql = grafana_sql(raw, dashboard, selected, start, end, interval)
        assert "$" not in sql, sql
        try:
            results[title] = run(conn, sql)
        except psycopg.Error as e:
            failures.append((title, e.sqlstate, str(e).splitlines()[0], sql))
    for a in dashboard["annotations"]["list"]:
        if not a.get("builtIn"):
            sql = grafana_sql(a["target"]["rawSql"], dashboard, selected, start, end, interval)
            try:
                results["annotation: " + a["name"]] = run(conn, sql)
            except psycopg.Error as e:
                failures.append((a["name"], e.sqlstate, str(e).splitlines()[0], sql))
    assert failures == [], "\n\n".join(map(str, failures))
    return results


def where(selected):
    """The variables' filter as DuckDB SQL with its parameters."""
    clauses, params = [], []
    columns = {"consumer": "consumer", "team": "team", "model": "coalesce(served_model, requested_model)"}
    for name, value in selected.items():
        if value != ALL:
            clauses.append(f"{columns[name]} IN ({', '.join('?' * len(value))})")
            params += value
    return "".join(f" AND {c}" for c in clauses), params


def selections():
    everything = {"consumer": ALL, "team": ALL, "model": ALL}
    return [everything,
            {**everything, "consumer": ["python-app"]},
            {**everything, "model": ["qwq-32b"]},
            {**everything, "consumer": ["python-app", "qwq-only"], "model": ["deepseek-reasoner", "qwq-32b"]}]


def test_every_panel_runs_as_grafana_sends_it_and_the_traffic_fills_them(gateway, traffic, dashboard):
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        conn.autocommit = True
        for start, end in span(gateway):
            options = with_options(dashboard, conn, start, end)
            bounds = [rfc3339nano(start), rfc3339nano(end)]
            duck = lake(gateway)
            in_range = "ts_start BETWEEN ?::TIMESTAMPTZ AND ?::TIMESTAMPTZ"
            assert options["consumer"] == [r[0] for r in duck.execute(
                f"SELECT DISTINCT consumer FROM usage WHERE {in_range} AND consumer IS NOT NULL ORDER BY 1",
                bounds).fetchall()]
            assert options["model"] == [r[0] for r in duck.execute(
                f"SELECT DISTINCT coalesce(served_model, requested_model) FROM usage WHERE {in_range} "
                "AND coalesce(served_model, requested_model) IS NOT NULL ORDER BY 1", bounds).fetchall()]
            assert "python-app" in options["consumer"] and options["team"] == []
            for selected in selections():
                for interval in [60, 3600]:
                    results = run_panels(dashboard, conn, selected, start, end, interval)
                    extra, params = where(selected)
                    n = duck.execute(f"SELECT count(*) FROM usage WHERE {in_range}{extra}",
                                     bounds + params).fetchone()[0]
                    assert results["Requests"][1] == [(n,)], (selected, start, end)
                    if selected["consumer"] == ALL and selected["model"] == ALL:
                        empty = [t for t in FILLED if not results[t][1]]
                        assert empty == [], (empty, start, end)
                    consumers = {r[0] for r in results["Top consumers"][1]}
                    if selected["consumer"] != ALL:
                        assert consumers <= set(selected["consumer"]), consumers
                    for title in RULES:
                        assert title in results


def test_panel_numbers_equal_duckdb_on_the_lake(gateway, traffic, dashboard):
    """Spend by model, tokens, latency percentiles, the spend stat and the
    top consumers, with the variables at All and at single values."""
    raw = {title: sql for title, _, sql in targets(dashboard)}
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        conn.autocommit = True
        for start, end in span(gateway):
            with_options(dashboard, conn, start, end)
            bounds = [rfc3339nano(start), rfc3339nano(end)]
            duck = lake(gateway)
            in_range = "ts_start BETWEEN ?::TIMESTAMPTZ AND ?::TIMESTAMPTZ"
            for selected in selections():
                extra, params = where(selected)
                args = bounds + params

                def panel(title, interval=60):
                    return run(conn, grafana_sql(raw[title], dashboard, selected, start, end, interval))

                names, rows = panel("Spend by model")
                assert names == ["time", "metric", "value"]
                want = duck.execute(
                    f"SELECT floor(epoch(ts_start)/60)*60, coalesce(served_model, requested_model), sum(cost_usd) "
                    f"FROM usage WHERE {in_range}{extra} GROUP BY 1, 2", args).fetchall()
                assert {(float(t), m): v for t, m, v in rows} == {(float(t), m): v for t, m, v in want}, selected
                assert [t for t, _, _ in rows] == sorted(t for t, _, _ in rows), "sorted by time"

                names, rows = panel("Tokens by kind", 3600)
                assert names == ["time", "input", "cached input", "output", "reasoning"]
                want = duck.execute(
                    "SELECT floor(epoch(ts_start)/3600)*3600, sum(input_tokens), sum(cached_input_tokens), "
                    f"sum(output_tokens), sum(reasoning_tokens) FROM usage WHERE {in_range}{extra} GROUP BY 1 "
                    "ORDER BY 1", args).fetchall()
                assert [(float(r[0]), *r[1:]) for r in rows] == [(float(r[0]), *r[1:]) for r in want], selected

                names, rows = panel("Latency and time to first token")
                assert names == ["time", "latency p50", "latency p95", "TTFT p50", "TTFT p95"]
                want = duck.execute(
                    "SELECT floor(epoch(ts_start)/60)*60, quantile_cont(latency_ms, 0.5), "
                    "quantile_cont(latency_ms, 0.95), quantile_cont(ttft_ms, 0.5), quantile_cont(ttft_ms, 0.95), "
                    "max(latency_ms) - min(latency_ms), max(ttft_ms) - min(ttft_ms) "
                    f"FROM usage WHERE {in_range}{extra} AND status < 400 GROUP BY 1 ORDER BY 1", args).fetchall()
                # Within the interpolation step of the server's percentile_cont
                # (see test_percentile_cont_interpolates_like_postgresql).
                got = [(float(r[0]), *r[1:]) for r in rows]
                assert got == [(float(t), *(None if v is None else pytest.approx(v, rel=1e-12, abs=1e-6 * spread)
                                             for v, spread in [(lp50, lw), (lp95, lw), (tp50, tw), (tp95, tw)]))
                               for t, lp50, lp95, tp50, tp95, lw, tw in want], selected

                _, rows = panel("Spend")
                assert rows == duck.execute(f"SELECT sum(cost_usd) FROM usage WHERE {in_range}{extra}",
                                            args).fetchall(), selected

                names, rows = panel("Top consumers")
                assert names == ["consumer", "team", "requests", "input_tokens", "output_tokens", "spend_usd",
                                 "error_rate", "last_request"]
                want = duck.execute(
                    "SELECT consumer, team, count(*), sum(input_tokens), sum(output_tokens), sum(cost_usd), "
                    "avg(CASE WHEN status >= 400 THEN 1.0 ELSE 0.0 END), max(ts_start) "
                    f"FROM usage WHERE {in_range}{extra} GROUP BY consumer, team "
                    "ORDER BY sum(cost_usd) DESC NULLS LAST, consumer LIMIT 20", args).fetchall()
                assert [r[:6] + (pytest.approx(float(r[6])), r[7]) for r in want] == \
                    [r[:6] + (float(r[6]), r[7]) for r in rows], selected
                assert rows, selected


@pytest.mark.xfail(strict=True, reason="server gap: percentile_cont (DataFusion 55.2) truncates the interpolation "
                   "weight to 6 decimal places; PostgreSQL interpolates in float8. Remove this mark once fixed.")
def test_percentile_cont_interpolates_like_postgresql(gateway):
    """The latency panel's percentile_cont(p) WITHIN GROUP (ORDER BY x), as
    PostgreSQL computes it: x[floor(p(n-1))] plus the fractional part of
    p(n-1) times the step to the next value, in float8."""
    values = [1, 2, 3, 100]
    sql = "SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY x) FROM (VALUES (1), (2), (3), (100)) t(x)"
    position = 0.95 * (len(values) - 1)
    lower = int(position // 1)
    want = values[lower] + (position - lower) * (values[lower + 1] - values[lower])
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        got = conn.execute(sql, prepare=False).fetchone()[0]
    assert got == pytest.approx(want, rel=1e-12), (got, want)


def test_a_consumer_login_runs_every_panel_over_its_own_rows(gateway, traffic, dashboard):
    """A team's Grafana data source with a consumer's name and key: every
    panel runs and shows that consumer alone."""
    with pg(gateway, "qwq-only", LIMITED_KEY) as conn:
        conn.autocommit = True
        start, end = span(gateway)[0]
        options = with_options(dashboard, conn, start, end)
        assert options["consumer"] == ["qwq-only"]
        results = run_panels(dashboard, conn, {"consumer": ALL, "team": ALL, "model": ALL}, start, end, 60)
        assert [r[0] for r in results["Top consumers"][1]] == ["qwq-only"]
        n = lake(gateway).execute("SELECT count(*) FROM usage WHERE consumer = 'qwq-only'").fetchone()[0]
        assert results["Requests"][1] == [(n,)]
        assert results["Budgets"][1] == [] and results["Recent alerts"][1] == []


# --- a gateway with teams, limits, a budget and alerts ------------------------------------------------------------

BILLING_KEY = test_limits.BILLING_KEY
RULES_TOML = """[[rate_limits]]
name = "billing-r1"
consumer = "billing-app"
model = "deepseek-r1"
key = "consumer"
requests_per_minute = 1
on_limit = {{ fallback = "qwq-32b" }}

[[rate_limits]]
name = "billing-qwq"
consumer = "billing-app"
model = "qwq-32b"
key = "consumer"
requests_per_minute = 3

[[budgets]]
name = "search-daily"
team = "search"
usd = "0.0001"
period = "day"
alert_at = [0.5, 1.0]
on_exhausted = "block"

[alerts]
evaluate_ms = 500
outbox_dir = "{outbox}"
"""


def chat(addr, key, model):
    body = {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "How much did we spend?"}]}
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def ruled(artifacts):
    d = artifacts / "grafana"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    sim = test_limits.simulator(d)
    gw = test_limits.gateway(d, "gw", sim, RULES_TOML.format(outbox=d / "gw" / "outbox"), query=True)
    try:
        statuses = {"search": [chat(gw.addr, KEY, "deepseek-r1") for _ in range(5)],
                    "billing": [chat(gw.addr, BILLING_KEY, "deepseek-r1") for _ in range(3)]
                    + [chat(gw.addr, BILLING_KEY, "qwq-32b") for _ in range(4)]}
        files = str(gw.lake / "usage" / "**" / "*.parquet")
        sent = sum(len(s) for s in statuses.values())
        test_limits.wait_for(lambda: list(gw.lake.rglob("*.parquet")) and duckdb.execute(
            "SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0] == sent, "the lake", timeout=20)
        yield gw, statuses
    finally:
        gw.stop()
        sim.stop()


def test_budgets_alerts_limits_and_teams_fill_their_panels(ruled, dashboard):
    gw, statuses = ruled
    assert 429 in statuses["search"] and 200 in statuses["search"], statuses
    assert 429 in statuses["billing"], statuses
    raw = {title: sql for title, _, sql in targets(dashboard)}
    everything = {"consumer": ALL, "team": ALL, "model": ALL}
    duck = lake(gw)
    with pg(gw, "admin", ADMIN_TOKEN) as conn:
        conn.autocommit = True
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(minutes=5)

        def alerts():
            sql = grafana_sql(raw["Recent alerts"], dashboard, everything, start, end, 60)
            return run(conn, sql)[1]

        test_limits.wait_for(lambda: alerts(), "a budget alert in the alerts table", timeout=30)
        options = with_options(dashboard, conn, start, end)
        assert options["team"] == ["billing", "search"] and options["consumer"] == ["billing-app", "python-app"]
        results = run_panels(dashboard, conn, everything, start, end, 60)
        assert [t for t in FILLED + RULES if not results[t][1]] == []

        names, rows = results["Recent alerts"]
        assert names == ["id", "fired_at", "kind", "status", "name", "message"]
        assert ("budget", "firing", "search-daily") in {(r[2], r[3], r[4]) for r in rows}, rows
        assert all(r[1].tzinfo is not None and start <= r[1] <= end for r in rows)
        assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
        assert results["annotation: Tollgate alerts"][1], "the alerts as annotations"

        names, rows = results["Budgets"]
        budget = dict(zip(names, rows[0]))
        assert budget["name"] == "search-daily" and budget["usd"] == decimal.Decimal("0.0001")
        spent = duck.execute("SELECT sum(cost_usd) FROM usage WHERE team = 'search' AND ts_start >= ? "
                             "AND ts_start < ?", [budget["resets_at"] - datetime.timedelta(days=1),
                                                  budget["resets_at"]]).fetchone()[0]
        assert budget["spent_usd"] == spent > 0
        assert budget["spent_fraction"] == pytest.approx(float(spent / budget["usd"]))
        assert 0.5 <= budget["spent_fraction"] <= 1.0

        _, rows = results["Rate-limited requests"]
        kinds = {}
        for _, metric, n in rows:
            kinds[metric] = kinds.get(metric, 0) + n
        want = dict(duck.execute(
            "SELECT CASE WHEN outcome IN ('rate_limited', 'budget_exceeded') THEN 'refused: ' || outcome "
            "ELSE 'rerouted: ' || coalesce(fallback_reason, 'rate_limited') END, count(*) FROM usage "
            "WHERE outcome IN ('rate_limited', 'budget_exceeded') OR rate_limited GROUP BY 1").fetchall())
        assert kinds == want, (kinds, want)
        assert {"refused: rate_limited", "refused: budget_exceeded", "rerouted: rate_limited"} <= set(kinds), kinds
        assert kinds["refused: budget_exceeded"] == statuses["search"].count(429)

        _, rows = results["Spend by team"]
        assert dict(rows) == dict(duck.execute(
            "SELECT coalesce(team, '(no team)'), coalesce(sum(cost_usd), 0) FROM usage GROUP BY 1").fetchall())
        assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)

        billing = run_panels(dashboard, conn, {**everything, "team": ["billing"]}, start, end, 60)
        assert [r[0] for r in billing["Spend by team"][1]] == ["billing"]
        assert {r[0] for r in billing["Top consumers"][1]} == {"billing-app"}
        assert {m for _, m, _ in billing["Rate-limited requests"][1]} == {"refused: rate_limited",
                                                                          "rerouted: rate_limited"}
