"""Spark reads the lake as it is: no schema, no options, Hive partitions
discovered, every column decoded, the event id as its 16 bytes. Runs in its
own venv (pyspark, Debian's Java runtime), set up by scripts/test.sh."""

import os
import subprocess
import uuid

import pytest

EVENTS = 5000


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession
    s = (SparkSession.builder.master("local[1]").appName("tollgate-lake")
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.shuffle.partitions", "1").config("spark.sql.session.timeZone", "UTC")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A lake written by the ingester's own writer."""
    root = tmp_path_factory.mktemp("lake")
    tollgate = os.environ["TOLLGATE_BIN"]
    subprocess.run([tollgate, "gen-lake", "--lake", str(root), "--events", str(EVENTS), "--days", "2",
                    "--seed", "11"], check=True, capture_output=True)
    return root


def test_spark_reads_every_column_of_the_lake_without_options(spark, lake):
    df = spark.read.parquet(str(lake / "usage"))
    types = dict(df.dtypes)
    assert df.columns[-2:] == ["date", "hour"] and types["date"] == "date" and types["hour"] == "int"
    assert types["event_id"] == "binary" and types["cost_usd"].startswith("decimal(")
    assert types["tags"].startswith("map<") and types["attempts"].startswith("array<struct<")
    assert df.count() == EVENTS
    # Every value decodes (a full pass, not only the footers).
    assert df.rdd.map(len).sum() == EVENTS * len(df.columns)
    ids = [bytes(r[0]) for r in df.select("event_id").collect()]
    assert len(set(ids)) == EVENTS
    assert all(len(i) == 16 and uuid.UUID(bytes=i).version == 7 for i in ids)
    by_hour = df.groupBy("date", "hour").count().collect()
    assert sum(r["count"] for r in by_hour) == EVENTS and len(by_hour) > 1
