"""BI and driver clients, unmodified, against the PostgreSQL wire: SQLAlchemy 2
(inspection, reflection, pandas.read_sql), asyncpg, the statements Grafana's
PostgreSQL data source sends, psql meta-commands, and every kind of write
still refused. Answers are checked against DuckDB reading the same lake files,
or against a plain psycopg query on the same server."""

import asyncio
import datetime
import decimal
import io
import json
import re
import shutil
import uuid

import asyncpg
import duckdb
import pandas
import psycopg
import pytest
import sqlalchemy as sa

from conftest import ADMIN_TOKEN, LIMITED_KEY
from test_query import lake_glob, pg, psql, traffic  # noqa: F401  (traffic is a fixture)

USAGE_COLUMNS = 43
VIEWS = ["cost_by_tag", "daily_cost", "hourly_health"]
TABLES = ["alerts", "budgets", "prices", "rate_limits", "usage"]
DAILY_COST_COLUMNS = ["date", "consumer", "team", "model", "requests", "input_tokens", "cached_input_tokens",
                      "output_tokens", "reasoning_tokens", "cost_usd"]


def hostport(gateway):
    host, port = gateway.pg.rsplit(":", 1)
    return host, int(port)


def lake(gateway):
    """DuckDB with the lake as `usage`, in UTC, so the same SQL runs on both sides."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    src = f"read_parquet('{lake_glob(gateway)}', hive_partitioning = true)"
    kinds = dict(r[:2] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall())
    if kinds["event_id"] == "UUID":
        con.execute(f"CREATE VIEW usage AS SELECT * FROM {src}")
    else:
        # The id as plain 16 bytes (no UUID annotation in the file): read it
        # as the UUID the server shows.
        uuid_of = (r"CAST(regexp_replace(lower(hex(event_id)), '^(.{8})(.{4})(.{4})(.{4})(.{12})$', "
                   r"'\1-\2-\3-\4-\5') AS UUID)")
        con.execute(f"CREATE VIEW usage AS SELECT * REPLACE ({uuid_of} AS event_id) FROM {src}")
    return con


def pg_types(gateway):
    """The PostgreSQL type of every `usage` column, as (name, data_type,
    udt_name, SQLAlchemy type name), derived from DuckDB's reading of the
    Parquet files: tags (a map) and attempts (a list of structs) are json,
    the 16-byte id is uuid."""
    out = []
    for name, duck_type, *_ in lake(gateway).execute("DESCRIBE usage").fetchall():
        if name == "hour":
            # The partition column is declared Int32; DuckDB infers hive
            # partition values as BIGINT.
            duck_type = "INTEGER"
        if duck_type == "UUID":
            t = ("uuid", "uuid", "UUID")
        elif duck_type == "INTEGER":
            t = ("integer", "int4", "INTEGER")
        elif duck_type == "BIGINT":
            t = ("bigint", "int8", "BIGINT")
        elif duck_type == "VARCHAR":
            t = ("text", "text", "TEXT")
        elif duck_type == "BOOLEAN":
            t = ("boolean", "bool", "BOOLEAN")
        elif duck_type == "DATE":
            t = ("date", "date", "DATE")
        elif duck_type == "TIMESTAMP WITH TIME ZONE":
            t = ("timestamp with time zone", "timestamptz", "TIMESTAMP WITH TIME ZONE")
        elif duck_type.startswith("DECIMAL"):
            t = ("numeric", "numeric", "NUMERIC")
        elif duck_type.startswith("MAP") or duck_type.endswith("[]"):
            t = ("json", "json", "JSON")
        else:
            raise AssertionError(f"no PostgreSQL type for {name} {duck_type}")
        out.append((name, *t))
    assert len(out) == USAGE_COLUMNS, out
    return out


def csv_text(value):
    """A value as COPY ... CSV writes it (NULL is an empty field)."""
    return "" if value is None else str(value)


def by_consumer_cost(gateway):
    return dict(lake(gateway).execute("SELECT consumer, sum(cost_usd) FROM usage GROUP BY consumer").fetchall())


def attempts_by_id(gateway):
    return {r[0]: json.loads(r[1]) for r in lake(gateway).execute(
        "SELECT event_id, to_json(attempts)::VARCHAR FROM usage").fetchall()}


# --- SQLAlchemy 2 + pandas ---------------------------------------------------------------------------------------

@pytest.fixture
def engine(gateway):
    host, port = hostport(gateway)
    eng = sa.create_engine(f"postgresql+psycopg://admin:{ADMIN_TOKEN}@{host}:{port}/tollgate")
    yield eng
    eng.dispose()


def test_sqlalchemy_connects_and_reads_the_server_version(gateway, traffic, engine):
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM usage")).scalar_one()
        consumers = conn.execute(sa.text("SELECT DISTINCT consumer FROM usage ORDER BY 1")).scalars().all()
    duck = lake(gateway)
    assert n == duck.execute("SELECT count(*) FROM usage").fetchone()[0] >= traffic
    assert consumers == [c for (c,) in duck.execute("SELECT DISTINCT consumer FROM usage ORDER BY 1").fetchall()]
    assert {"python-app", "qwq-only"} <= set(consumers)
    assert engine.dialect.server_version_info[:2] == (16, 6)


def test_sqlalchemy_inspects_the_ledger_tables_views_and_columns(gateway, traffic, engine):
    insp = sa.inspect(engine)
    tables = insp.get_table_names()
    assert set(TABLES) <= set(tables), tables
    assert not set(VIEWS) & set(tables), tables
    assert sorted(insp.get_view_names()) == VIEWS
    assert insp.has_table("usage") and not insp.has_table("no_such_table")
    columns = insp.get_columns("usage")
    got = [(c["name"], c["type"].compile(dialect=engine.dialect)) for c in columns]
    want = [(name, sa_name) for name, _, _, sa_name in pg_types(gateway)]
    # NUMERIC may carry its precision and scale, NUMERIC(18, 10); the rest
    # is compared exactly.
    assert [(n, t.split("(")[0]) for n, t in got] == want, got
    types = {c["name"]: c["type"] for c in columns}
    assert isinstance(types["event_id"], sa.Uuid)
    assert isinstance(types["tags"], sa.JSON) and isinstance(types["attempts"], sa.JSON)
    assert isinstance(types["cost_usd"], sa.Numeric) and not isinstance(types["cost_usd"], sa.Float)
    assert isinstance(types["ts_start"], sa.DateTime) and types["ts_start"].timezone is True
    assert isinstance(types["date"], sa.Date)
    view = [c["name"] for c in insp.get_columns("daily_cost")]
    assert view == DAILY_COST_COLUMNS


def test_sqlalchemy_lists_schemas_and_reflects_no_keys_or_indexes(gateway, traffic, engine):
    """The rest of what `MetaData.reflect()` and ORM automap ask: the ledger
    has no primary key, index, unique constraint or foreign key."""
    insp = sa.inspect(engine)
    assert "public" in insp.get_schema_names()
    assert insp.get_pk_constraint("usage")["constrained_columns"] == []
    assert insp.get_indexes("usage") == []
    assert insp.get_unique_constraints("usage") == []
    assert insp.get_foreign_keys("usage") == []
    assert "usage" in insp.get_view_definition("daily_cost").lower()


def test_pandas_read_sql_through_sqlalchemy_equals_duckdb_on_the_lake(gateway, traffic, engine):
    query = "SELECT consumer, sum(cost_usd) AS cost FROM usage GROUP BY consumer"
    want = by_consumer_cost(gateway)
    # pandas turns numeric (Decimal) into float64 by default ...
    df = pandas.read_sql(query, engine)
    assert list(df.columns) == ["consumer", "cost"] and str(df.cost.dtype) == "float64"
    assert {r.consumer: r.cost for r in df.itertuples()} == {c: float(v) for c, v in want.items()}
    # ... and keeps the exact Decimal without coerce_float.
    df = pandas.read_sql(query, engine, coerce_float=False)
    got = {r.consumer: r.cost for r in df.itertuples()}
    assert got == want and all(isinstance(v, decimal.Decimal) for v in got.values()), got


def test_pandas_read_sql_binds_a_named_parameter_through_sqlalchemy(gateway, traffic, engine):
    q = sa.text("SELECT count(*) AS n, sum(output_tokens) AS out, sum(cost_usd) AS cost "
                "FROM usage WHERE consumer = :c AND status < :s")
    for consumer in ["python-app", "qwq-only"]:
        df = pandas.read_sql(q, engine, params={"c": consumer, "s": 400})
        want = lake(gateway).execute("SELECT count(*), sum(output_tokens), sum(cost_usd) FROM usage "
                                     "WHERE consumer = ? AND status < ?", [consumer, 400]).fetchone()
        assert want[0] > 0
        assert (int(df.n[0]), int(df.out[0]), df.cost[0]) == (want[0], want[1], float(want[2])), (consumer, df)


def test_sqlalchemy_reflects_usage_and_a_core_select_reads_it(gateway, traffic, engine):
    usage = sa.Table("usage", sa.MetaData(), autoload_with=engine)
    assert [c.name for c in usage.columns] == [name for name, *_ in pg_types(gateway)]
    assert isinstance(usage.c.event_id.type, sa.Uuid)
    stmt = (sa.select(usage.c.consumer, sa.func.count().label("n"), sa.func.sum(usage.c.cost_usd).label("cost"))
            .where(usage.c.status < 400).group_by(usage.c.consumer).order_by(usage.c.consumer))
    with engine.connect() as conn:
        got = [tuple(r) for r in conn.execute(stmt)]
        ids = conn.execute(sa.select(usage.c.event_id, usage.c.attempts, usage.c.ts_start)
                           .where(usage.c.consumer == "qwq-only")).all()
    duck = lake(gateway)
    assert got == duck.execute("SELECT consumer, count(*), sum(cost_usd) FROM usage WHERE status < 400 "
                               "GROUP BY consumer ORDER BY consumer").fetchall()
    want = {r[0]: r[1] for r in duck.execute("SELECT event_id, ts_start FROM usage WHERE consumer = 'qwq-only'").fetchall()}
    attempts = attempts_by_id(gateway)
    assert {r.event_id for r in ids} == set(want) and len(ids) == len(want)
    for r in ids:
        assert isinstance(r.event_id, uuid.UUID)
        assert r.ts_start == want[r.event_id] and r.ts_start.tzinfo is not None
        assert r.attempts == attempts[r.event_id]


# --- asyncpg -----------------------------------------------------------------------------------------------------

def run_asyncpg(gateway, body, user="admin", password=ADMIN_TOKEN):
    host, port = hostport(gateway)

    async def main():
        conn = await asyncpg.connect(host=host, port=port, user=user, password=password, database="tollgate",
                                     timeout=10)
        try:
            return await body(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


def test_asyncpg_fetches_select_star_with_every_column_decoded(gateway, traffic):
    async def body(conn):
        plain = await conn.fetch("SELECT * FROM usage LIMIT 3")
        await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        decoded = await conn.fetch("SELECT * FROM usage LIMIT 3")
        return plain, decoded

    plain, decoded = run_asyncpg(gateway, body)
    want = {r[0]: r[1:] for r in lake(gateway).execute(
        "SELECT event_id, ts_start, cost_usd, consumer, date FROM usage").fetchall()}
    attempts = attempts_by_id(gateway)
    assert len(plain) == len(decoded) == 3
    assert list(plain[0].keys()) == [name for name, *_ in pg_types(gateway)]
    for r in plain:
        # asyncpg hands json over as text unless a codec is set.
        assert isinstance(r["event_id"], uuid.UUID) and isinstance(r["attempts"], str)
        assert json.loads(r["attempts"]) == attempts[r["event_id"]]
        assert (r["ts_start"], r["cost_usd"], r["consumer"], r["date"]) == want[r["event_id"]]
        assert r["ts_start"].tzinfo is not None
    for r in decoded:
        assert isinstance(r["attempts"], list) and r["attempts"] == attempts[r["event_id"]]
        assert r["tags"] is None or isinstance(r["tags"], dict)


def test_asyncpg_binds_dollar_parameters(gateway, traffic):
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)

    async def body(conn):
        rows = await conn.fetch("SELECT consumer, count(*) AS n, sum(cost_usd) AS cost FROM usage "
                                "WHERE consumer = $1 AND status < $2 AND ts_start >= $3 GROUP BY consumer",
                                "python-app", 400, since)
        one = await conn.fetchval("SELECT count(*) FROM usage WHERE date = $1 AND cost_usd >= $2",
                                  since.date() + datetime.timedelta(days=1), decimal.Decimal("0"))
        return [tuple(r) for r in rows], one

    rows, one = run_asyncpg(gateway, body)
    duck = lake(gateway)
    assert rows == duck.execute("SELECT consumer, count(*), sum(cost_usd) FROM usage "
                                "WHERE consumer = ? AND status < ? AND ts_start >= ? GROUP BY consumer",
                                ["python-app", 400, since]).fetchall()
    assert one == duck.execute("SELECT count(*) FROM usage WHERE date = ? AND cost_usd >= 0",
                               [since.date() + datetime.timedelta(days=1)]).fetchone()[0]


def test_asyncpg_reads_through_a_cursor_in_a_transaction(gateway, traffic):
    async def body(conn):
        async with conn.transaction():
            streamed = [(r["event_id"], r["ts_start"], r["output_tokens"]) async for r in
                        conn.cursor("SELECT event_id, ts_start, output_tokens FROM usage ORDER BY ts_start", prefetch=2)]
            cur = await conn.cursor("SELECT consumer, output_tokens FROM usage WHERE consumer = $1 ORDER BY ts_start",
                                    "python-app")
            first = await cur.fetch(3)
            rest = await cur.fetch(10_000)
        return streamed, [tuple(r) for r in first], [tuple(r) for r in rest]

    streamed, first, rest = run_asyncpg(gateway, body)
    duck = lake(gateway)
    want = duck.execute("SELECT event_id, ts_start, output_tokens FROM usage").fetchall()
    assert sorted(streamed) == sorted(want)
    assert [r[1] for r in streamed] == sorted(r[1] for r in streamed)
    want = duck.execute("SELECT consumer, output_tokens FROM usage WHERE consumer = 'python-app'").fetchall()
    assert len(first) == 3 and sorted(first + rest) == sorted(want)



def test_asyncpg_copies_a_query_out_to_a_buffer(gateway, traffic):
    async def body(conn):
        buf = io.BytesIO()
        status = await conn.copy_from_query("SELECT consumer, count(*) AS n FROM usage GROUP BY 1 ORDER BY 1",
                                            output=buf, format="csv", header=True)
        return status, buf.getvalue().decode()

    status, text = run_asyncpg(gateway, body)
    want = lake(gateway).execute("SELECT consumer, count(*) FROM usage GROUP BY 1 ORDER BY 1").fetchall()
    assert text.splitlines() == ["consumer,n"] + [f"{csv_text(c)},{n}" for c, n in want]
    # CommandComplete counts the rows copied, not the header line.
    assert status == f"COPY {len(want)}"


# --- Grafana's PostgreSQL data source ----------------------------------------------------------------------------
# Statements as Grafana sends them (simple protocol): the health check
# (pgx `Ping`, lib/pq `Ping`), version and TimescaleDB detection
# (postgresMetaQuery.ts), the schema API (schema.go), the frontend's table and
# column lists, and panel queries with the macros expanded by macros.go.

GRAFANA_PING_PGX = "-- ping"
GRAFANA_PING_LIBPQ = ";"
GRAFANA_VERSION = "SELECT current_setting('server_version_num')::int/100 as version"
GRAFANA_TIMESCALEDB = "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"

GRAFANA_SEARCH_PATH = """
          quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          )"""

GRAFANA_SHOW_TABLES = f"""SELECT
    CASE WHEN {GRAFANA_SEARCH_PATH}
      THEN quote_ident(table_name)
      ELSE quote_ident(table_schema) || '.' || quote_ident(table_name)
    END AS "table"
    FROM information_schema.tables
    WHERE quote_ident(table_schema) NOT IN ('information_schema',
                             'pg_catalog',
                             '_timescaledb_cache',
                             '_timescaledb_catalog',
                             '_timescaledb_internal',
                             '_timescaledb_config',
                             'timescaledb_information',
                             'timescaledb_experimental')
    ORDER BY CASE WHEN {GRAFANA_SEARCH_PATH} THEN 0 ELSE 1 END, 1"""


def grafana_get_schema(table):
    return f"""SELECT quote_ident(column_name) AS "column", data_type AS "type"
    FROM information_schema.columns
    WHERE
      CASE WHEN array_length(parse_ident('{table}'),1) = 2
        THEN quote_ident(table_schema) = (parse_ident('{table}'))[1]
          AND quote_ident(table_name) = (parse_ident('{table}'))[2]
        ELSE quote_ident(table_name) = '{table}'
          AND {GRAFANA_SEARCH_PATH}
      END"""


GRAFANA_SCHEMATA = """SELECT schema_name FROM information_schema.schemata
		 WHERE schema_name NOT LIKE 'pg_%' AND schema_name != 'information_schema'
		 ORDER BY schema_name"""
GRAFANA_TABLES = """SELECT table_name FROM information_schema.tables
		 WHERE table_schema = 'public' AND table_type IN ('BASE TABLE', 'VIEW')
		 ORDER BY table_name"""
GRAFANA_COLUMNS = """SELECT column_name, data_type, udt_name, numeric_precision, numeric_scale
		 FROM information_schema.columns
		 WHERE table_schema = 'public' AND table_name = 'usage'
		 ORDER BY ordinal_position"""
GRAFANA_COLUMN_VALUES = """SELECT 'served_model' AS col_name, "served_model"::text AS val FROM (SELECT DISTINCT "served_model" FROM "public"."usage" WHERE "served_model" IS NOT NULL ORDER BY "served_model" LIMIT 100) sub_0 UNION ALL SELECT 'consumer' AS col_name, "consumer"::text AS val FROM (SELECT DISTINCT "consumer" FROM "public"."usage" WHERE "consumer" IS NOT NULL ORDER BY "consumer" LIMIT 100) sub_1"""

# $__timeGroupAlias(ts_start, 5m), $__timeFilter(ts_start)
GRAFANA_PANEL_TIMEGROUP = """SELECT
  floor(extract(epoch from ts_start)/300)*300 AS "time",
  served_model AS metric,
  sum(cost_usd) AS value
FROM usage
WHERE ts_start BETWEEN '{from_}' AND '{to}'
GROUP BY 1, 2
ORDER BY 1"""
# $__timeGroupAlias(ts_start, 1h), $__timeFilter(ts_start), a wide frame
GRAFANA_PANEL_WIDE = """SELECT
  floor(extract(epoch from ts_start)/3600)*3600 AS "time",
  count(*) AS requests,
  avg(latency_ms) AS avg_latency_ms
FROM usage
WHERE ts_start BETWEEN '{from_}' AND '{to}'
GROUP BY 1
ORDER BY 1"""
# date_trunc with $__timeFrom()/$__timeTo() cast to timestamptz
GRAFANA_PANEL_DATE_TRUNC = """SELECT
  date_trunc('hour', ts_start) AS "time",
  consumer AS metric,
  count(*) AS value
FROM usage
WHERE ts_start BETWEEN '{from_}'::timestamptz AND '{to}'::timestamptz
GROUP BY 1, 2
ORDER BY 1"""
# $__unixEpochGroupAlias-style grouping with $__unixEpochFilter
GRAFANA_PANEL_UNIX_EPOCH = """SELECT
  floor((extract(epoch from ts_start))/60)*60 AS "time",
  count(*) AS value
FROM usage
WHERE extract(epoch from ts_start) >= {from_epoch} AND extract(epoch from ts_start) <= {to_epoch}
GROUP BY 1
ORDER BY 1"""
GRAFANA_VARIABLE = "SELECT DISTINCT consumer FROM usage ORDER BY 1"


def grafana_ranges(gateway):
    """Dashboard time ranges as macros.go renders them (RFC 3339, UTC): one
    around all the traffic and one that ends inside it."""
    ts = [r[0] for r in lake(gateway).execute("SELECT ts_start FROM usage ORDER BY ts_start").fetchall()]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    mid = ts[len(ts) // 2].astimezone(datetime.timezone.utc).replace(microsecond=0)
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return [((now - datetime.timedelta(hours=6)).strftime(fmt), (now + datetime.timedelta(hours=1)).strftime(fmt)),
            ((now - datetime.timedelta(hours=6)).strftime(fmt), mid.strftime(fmt))]


def test_grafana_health_check_version_and_timescaledb_probe(gateway, traffic):
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        conn.autocommit = True
        for ping in [GRAFANA_PING_PGX, GRAFANA_PING_LIBPQ]:
            cur = conn.execute(ping)
            assert cur.pgresult.status == psycopg.pq.ExecStatus.EMPTY_QUERY, ping
            assert cur.description is None
        cur = conn.execute(GRAFANA_VERSION)
        assert [d.name for d in cur.description] == ["version"]
        version = cur.fetchone()[0]
        assert version == int(conn.execute("SHOW server_version_num").fetchone()[0]) // 100 == 1600
        cur = conn.execute(GRAFANA_TIMESCALEDB)
        assert [d.name for d in cur.description] == ["extversion"] and cur.fetchall() == []


def test_grafana_schema_browser_lists_schemas_tables_and_typed_columns(gateway, traffic):
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        assert conn.execute(GRAFANA_SCHEMATA).fetchall() == [("public",)]
        assert [r[0] for r in conn.execute(GRAFANA_TABLES)] == sorted(TABLES + VIEWS)
        values = conn.execute(GRAFANA_COLUMN_VALUES).fetchall()
        cur = conn.execute(GRAFANA_COLUMNS)
        assert [d.name for d in cur.description] == ["column_name", "data_type", "udt_name", "numeric_precision",
                                                     "numeric_scale"]
        columns = cur.fetchall()
    duck = lake(gateway)
    want_values = [("served_model", v) for (v,) in duck.execute(
        "SELECT DISTINCT served_model FROM usage WHERE served_model IS NOT NULL ORDER BY 1").fetchall()]
    want_values += [("consumer", v) for (v,) in duck.execute(
        "SELECT DISTINCT consumer FROM usage WHERE consumer IS NOT NULL ORDER BY 1").fetchall()]
    # UNION ALL promises no order between its branches.
    assert sorted(values) == sorted(want_values)
    assert [(name, data_type, udt) for name, data_type, udt, _, _ in columns] == \
        [(name, data_type, udt) for name, data_type, udt, _ in pg_types(gateway)]
    precision = {"int4": (32, 0), "int8": (64, 0)}
    for name, _, udt, p, s in columns:
        if udt in precision:
            assert (p, s) == precision[udt], (name, udt, p, s)
        elif udt == "numeric":
            # numeric without a typmod has neither (as psql's \d shows it);
            # with one, DuckDB's DECIMAL(18,10).
            assert (p, s) in [(None, None), (18, 10)], (name, p, s)
        else:
            assert (p, s) == (None, None), (name, udt, p, s)


def test_grafana_table_and_column_lists_name_tables_on_the_search_path(gateway, traffic):
    """The query editor's table list and its column autocomplete for the
    bare table name (`getSchema('usage')`) and a qualified one."""
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        tables = [r[0] for r in conn.execute(GRAFANA_SHOW_TABLES)]
        cur = conn.execute(grafana_get_schema("usage"))
        assert [d.name for d in cur.description] == ["column", "type"]
        bare = cur.fetchall()
        qualified = conn.execute(grafana_get_schema("public.daily_cost")).fetchall()
    assert sorted(tables) == sorted(TABLES + VIEWS), tables
    assert len(bare) == USAGE_COLUMNS
    assert sorted(bare) == sorted((name, data_type) for name, data_type, _, _ in pg_types(gateway))
    assert sorted(c for c, _ in qualified) == sorted(DAILY_COST_COLUMNS)
    types = dict(qualified)
    assert (types["date"], types["consumer"], types["requests"], types["cost_usd"]) == \
        ("date", "text", "bigint", "numeric"), qualified


def test_grafana_time_series_panels_equal_duckdb_over_the_time_filter(gateway, traffic):
    duck = lake(gateway)
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        for from_, to in grafana_ranges(gateway):
            bounds = [from_, to]
            cur = conn.execute(GRAFANA_PANEL_TIMEGROUP.format(from_=from_, to=to))
            assert [d.name for d in cur.description] == ["time", "metric", "value"]
            got = {(float(t), m): v for t, m, v in cur.fetchall()}
            want = {(float(t), m): v for t, m, v in duck.execute(
                "SELECT floor(epoch(ts_start)/300)*300, served_model, sum(cost_usd) FROM usage "
                "WHERE ts_start BETWEEN ?::TIMESTAMPTZ AND ?::TIMESTAMPTZ GROUP BY 1, 2", bounds).fetchall()}
            assert got == want, (from_, to)

            cur = conn.execute(GRAFANA_PANEL_WIDE.format(from_=from_, to=to))
            assert [d.name for d in cur.description] == ["time", "requests", "avg_latency_ms"]
            got = [(float(t), n, pytest.approx(float(a))) for t, n, a in cur.fetchall()]
            want = [(float(t), n, float(a)) for t, n, a in duck.execute(
                "SELECT floor(epoch(ts_start)/3600)*3600, count(*), avg(latency_ms) FROM usage "
                "WHERE ts_start BETWEEN ?::TIMESTAMPTZ AND ?::TIMESTAMPTZ GROUP BY 1 ORDER BY 1", bounds).fetchall()]
            assert want == got, (from_, to)

            cur = conn.execute(GRAFANA_PANEL_DATE_TRUNC.format(from_=from_, to=to))
            assert [d.name for d in cur.description] == ["time", "metric", "value"]
            rows = cur.fetchall()
            assert all(t.tzinfo is not None for t, _, _ in rows), rows
            want = duck.execute(
                "SELECT date_trunc('hour', ts_start), consumer, count(*) FROM usage "
                "WHERE ts_start BETWEEN ?::TIMESTAMPTZ AND ?::TIMESTAMPTZ GROUP BY 1, 2", bounds).fetchall()
            assert sorted(rows, key=repr) == sorted(want, key=repr), (from_, to)

            epochs = [int(datetime.datetime.strptime(b, "%Y-%m-%dT%H:%M:%SZ")
                          .replace(tzinfo=datetime.timezone.utc).timestamp()) for b in bounds]
            cur = conn.execute(GRAFANA_PANEL_UNIX_EPOCH.format(from_epoch=epochs[0], to_epoch=epochs[1]))
            got = [(float(t), n) for t, n in cur.fetchall()]
            want = [(float(t), n) for t, n in duck.execute(
                "SELECT floor(epoch(ts_start)/60)*60, count(*) FROM usage "
                "WHERE epoch(ts_start) >= ? AND epoch(ts_start) <= ? GROUP BY 1 ORDER BY 1", epochs).fetchall()]
            assert got == want, (from_, to)
        from_, to = grafana_ranges(gateway)[0]
        total = sum(n for _, n, _ in conn.execute(GRAFANA_PANEL_WIDE.format(from_=from_, to=to)).fetchall())
        assert total == duck.execute("SELECT count(*) FROM usage").fetchone()[0]
        assert [r[0] for r in conn.execute(GRAFANA_VARIABLE)] == [r[0] for r in duck.execute(
            "SELECT DISTINCT consumer FROM usage ORDER BY 1 NULLS LAST").fetchall()]


# --- psql meta-commands ------------------------------------------------------------------------------------------

needs_psql = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is installed by scripts/test.sh")


def psql_table(gateway, command):
    """A meta-command's output with its title, header and footer (-A, not -t)."""
    r = psql(gateway, "admin", ADMIN_TOKEN, "-P", "tuples_only=off", "-c", command)
    assert r.returncode == 0 and not r.stderr, (command, r.stdout, r.stderr)
    return r.stdout.splitlines()


@needs_psql
def test_psql_describes_a_view_with_its_definition(gateway, traffic):
    short = psql_table(gateway, r"\d daily_cost")
    lines = psql_table(gateway, r"\d+ daily_cost")
    assert lines[0] == 'View "public.daily_cost"'
    assert lines[1].split("|") == ["Column", "Type", "Collation", "Nullable", "Default", "Storage", "Description"]
    rows = lines[2:2 + len(DAILY_COST_COLUMNS)]
    assert [r.split("|")[:5] for r in rows] == [r.split("|") for r in short[2:]], lines
    assert [r.split("|")[0] for r in rows] == DAILY_COST_COLUMNS
    definition = "\n".join(lines[lines.index("View definition:") + 1:]).lower()
    # PostgreSQL's pg_get_viewdef qualifies columns (sum(usage.cost_usd)).
    assert "from usage" in definition and re.search(r"sum\((usage\.)?cost_usd\)", definition), lines


@needs_psql
def test_psql_lists_roles_functions_schemas_and_views(gateway, traffic):
    lines = psql_table(gateway, r"\du")
    assert lines[0] == "List of roles" and lines[1].split("|")[0] == "Role name", lines
    assert "admin" in [line.split("|")[0] for line in lines[2:]], lines
    lines = psql_table(gateway, r"\df")
    assert lines[0] == "List of functions", lines
    assert lines[1].split("|") == ["Schema", "Name", "Result data type", "Argument data types", "Type"], lines
    lines = psql_table(gateway, r"\dn")
    assert lines[:2] == ["List of schemas", "Name|Owner"] and lines[-1] == "(1 row)", lines
    assert [line.split("|")[0] for line in lines[2:-1]] == ["public"], lines
    r = psql(gateway, "admin", ADMIN_TOKEN, "-c", r"\dv")
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert [line.split("|")[1:3] for line in r.stdout.splitlines()] == [[v, "view"] for v in VIEWS], r.stdout


@needs_psql
def test_psql_copy_exports_a_query_as_csv_like_psycopg_reads_it(gateway, traffic):
    query = "SELECT consumer, count(*) FROM usage GROUP BY 1 ORDER BY 1"
    r = psql(gateway, "admin", ADMIN_TOKEN, "-c", rf"\copy ({query}) TO STDOUT CSV HEADER")
    assert r.returncode == 0 and not r.stderr, r.stderr
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        want = conn.execute(query).fetchall()
    assert {"python-app", "qwq-only"} <= {c for c, _ in want}
    assert r.stdout.splitlines() == ["consumer,count"] + [f"{csv_text(c)},{n}" for c, n in want]


# --- writes stay refused -----------------------------------------------------------------------------------------

WRITES = [
    "INSERT INTO usage (consumer) VALUES ('x')",
    "INSERT INTO usage SELECT * FROM usage",
    "UPDATE usage SET consumer = 'x'",
    "DELETE FROM usage",
    "DELETE FROM usage WHERE consumer = 'python-app'",
    "DROP TABLE usage",
    "DROP VIEW daily_cost",
    "CREATE TABLE t (x int)",
    "CREATE TABLE t AS SELECT * FROM usage",
    "CREATE VIEW v AS SELECT 1",
    "CREATE OR REPLACE VIEW daily_cost AS SELECT 1",
    "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/tmp/'",
    "COPY usage TO '/tmp/tollgate-bi-x.csv'",
    "COPY (SELECT * FROM usage) TO '/tmp/tollgate-bi-x.csv'",
    "SET datafusion.execution.batch_size = 1",
    "SET datafusion.catalog.information_schema = false",
    "ALTER TABLE usage ADD COLUMN x int",
    "ALTER TABLE usage RENAME TO u2",
    "TRUNCATE usage",
    "TRUNCATE TABLE usage",
    "GRANT SELECT ON usage TO public",
    "REVOKE SELECT ON usage FROM public",
]


def test_every_write_kind_is_refused_with_25006_over_psycopg(gateway, traffic):
    """Every statement is tried, in the simple and the extended protocol, as
    the admin and as a consumer; the failures are reported together."""
    before = lake(gateway).execute("SELECT count(*), sum(cost_usd) FROM usage").fetchone()
    wrong = []

    def refused(user, sql, mode, run):
        try:
            run()
        except psycopg.Error as e:
            if e.sqlstate != "25006":
                wrong.append((user, sql, mode, e.sqlstate, str(e).splitlines()[0]))
        else:
            wrong.append((user, sql, mode, "accepted", ""))

    for user, password in [("admin", ADMIN_TOKEN), ("qwq-only", LIMITED_KEY)]:
        with pg(gateway, user, password) as conn:
            conn.autocommit = True
            for sql in WRITES:
                for prepare in (False, True):
                    refused(user, sql, "extended" if prepare else "simple",
                            lambda: conn.execute(sql, prepare=prepare))
            refused(user, "DELETE FROM usage WHERE consumer = %s", "extended",
                    lambda: conn.execute("DELETE FROM usage WHERE consumer = %s", ["python-app"]))

            def copy_in(sql):
                with conn.cursor().copy(sql) as copy:
                    copy.write("x\n")

            for sql in ["COPY usage FROM STDIN", "COPY usage (consumer) FROM STDIN WITH (FORMAT csv)"]:
                refused(user, sql, "copy", lambda: copy_in(sql))
            assert conn.execute("SELECT count(*) FROM usage WHERE consumer = 'qwq-only'").fetchone()[0] > 0
    assert wrong == [], "\n".join(map(str, wrong))
    with pg(gateway, "admin", ADMIN_TOKEN) as conn:
        assert conn.execute("SELECT count(*), sum(cost_usd) FROM usage").fetchone() == before
        tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables "
                                              "WHERE table_schema = 'public'")}
        assert tables == set(TABLES + VIEWS)
        assert [d.name for d in conn.execute("SELECT * FROM usage LIMIT 0").description] == \
            [name for name, *_ in pg_types(gateway)]
    assert lake(gateway).execute("SELECT count(*), sum(cost_usd) FROM usage").fetchone() == before
