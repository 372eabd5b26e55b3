"""The official `openai` Python SDK against the gateway: what real apps do."""

import time

import duckdb
import openai
import pytest

from conftest import KEY, LIMITED_KEY


def client(gateway, key=KEY):
    return openai.OpenAI(base_url=f"http://{gateway.addr}/v1", api_key=key, max_retries=0, timeout=30)


MESSAGES = [{"role": "user", "content": "Is QwQ-32B cheaper than DeepSeek-R1 for our search traffic?"}]


def events_for(gateway, request_id, timeout=10.0):
    """The request's row, read from the gateway's Parquet lake by DuckDB."""
    files = str(gateway.lake / "usage" / "**" / "*.parquet")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any((gateway.lake / "usage").rglob("*.parquet")):
            cur = duckdb.execute(
                "SELECT * FROM read_parquet(?, hive_partitioning = true)"
                " WHERE coalesce(request_id, CAST(CAST(hex(event_id) AS UUID) AS VARCHAR)) = ?",
                [files, request_id],
            )
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
            if rows:
                assert len(rows) == 1, f"{request_id} has {len(rows)} rows"
                return dict(zip(names, rows[0]))
        time.sleep(0.05)
    raise AssertionError(f"no row for {request_id}")


def test_non_stream(gateway):
    raw = client(gateway).chat.completions.with_raw_response.create(model="deepseek-r1", messages=MESSAGES)
    resp = raw.parse()
    assert resp.model == "deepseek-r1"
    assert resp.usage.completion_tokens == 16
    assert resp.usage.completion_tokens_details.reasoning_tokens == 6
    assert resp.choices[0].message.content
    assert raw.headers["x-tollgate-served-model"] == "deepseek-reasoner"
    e = events_for(gateway, raw.headers["x-request-id"])
    assert e["output_tokens"] == 16 and e["consumer"] == "python-app" and e["cost_usd"] > 0


def test_stream_without_usage(gateway):
    chunks = list(client(gateway).chat.completions.create(model="deepseek-r1", messages=MESSAGES, stream=True))
    assert chunks, "no chunks"
    assert all(c.usage is None for c in chunks), "the usage chunk the gateway asked for is stripped"
    assert all(c.model == "deepseek-r1" for c in chunks)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning and content, "reasoning_content deltas are relayed untouched"


def test_stream_with_include_usage(gateway):
    stream = client(gateway).chat.completions.create(
        model="deepseek-r1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].choices == []


def test_fallback(gateway):
    raw = client(gateway).chat.completions.with_raw_response.create(model="flaky-r1", messages=MESSAGES)
    resp = raw.parse()
    assert raw.headers["x-tollgate-served-model"] == "qwq-32b"
    assert resp.model == "flaky-r1", "the client's model name is kept"
    assert resp.usage.completion_tokens == 12
    e = events_for(gateway, raw.headers["x-request-id"])
    assert e["fallback"] is True and e["fallback_reason"] == "5xx"
    assert [a["status"] for a in e["attempts"]] == [503, 200]


def test_fallback_streamed(gateway):
    chunks = list(client(gateway).chat.completions.create(model="flaky-r1", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_completions_and_embeddings(gateway):
    c = client(gateway)
    done = c.completions.create(model="qwq-32b", prompt="Say hi", max_tokens=4)
    assert done.usage.completion_tokens == 4
    emb = c.embeddings.create(model="qwq-32b", input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0


def test_models_lists_what_the_key_may_use(gateway):
    assert sorted(m.id for m in client(gateway).models.list()) == ["deepseek-r1", "flaky-r1", "qwq-32b"]
    assert [m.id for m in client(gateway, LIMITED_KEY).models.list()] == ["qwq-32b"]


def test_errors(gateway):
    with pytest.raises(openai.AuthenticationError) as e401:
        client(gateway, "tg-wrong").chat.completions.create(model="qwq-32b", messages=MESSAGES)
    assert e401.value.status_code == 401
    assert "tg-wrong" not in str(e401.value)
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, LIMITED_KEY).chat.completions.create(model="deepseek-r1", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as e400:
        client(gateway).chat.completions.create(model="qwq-32b", messages=[])
    assert e400.value.body["param"] == "messages"


def test_duckdb_reads_the_lake_with_the_same_totals(gateway):
    """DuckDB, a reader nobody here wrote, gets the totals the clients saw."""
    import decimal
    import uuid

    run = uuid.uuid4().hex
    seen = []
    for i in range(12):
        kwargs = dict(model="qwq-32b", messages=MESSAGES, extra_headers={"x-tollgate-tags": f"run={run}"})
        if i % 2:
            chunks = list(client(gateway).chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs))
            usage = chunks[-1].usage
        else:
            usage = client(gateway).chat.completions.create(**kwargs).usage
        seen.append((usage.prompt_tokens, usage.completion_tokens))

    files = str(gateway.lake / "usage" / "**" / "*.parquet")
    query = """
        SELECT count(*), sum(input_tokens), sum(output_tokens), sum(cost_usd),
               count(*) FILTER (WHERE date = strftime(ts_start AT TIME ZONE 'UTC', '%Y-%m-%d')
                                  AND CAST(hour AS INTEGER) = hour(ts_start AT TIME ZONE 'UTC'))
        FROM read_parquet(?, hive_partitioning = true)
        WHERE tags['run'] = ?
    """
    deadline = time.time() + 15
    while True:
        rows, input_tokens, output_tokens, cost, well_partitioned = duckdb.execute(query, [files, run]).fetchone()
        if rows == len(seen) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert rows == len(seen)
    assert input_tokens == sum(p for p, _ in seen)
    assert output_tokens == sum(c for _, c in seen)
    # qwq-32b costs $0.20 per million tokens in and out: exact decimals.
    price = decimal.Decimal("0.20") / 1_000_000
    assert cost == (input_tokens + output_tokens) * price
    assert well_partitioned == rows, "date/hour partitions match each row's start time"
