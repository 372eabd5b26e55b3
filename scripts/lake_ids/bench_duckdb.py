"""DuckDB side by side over event_id variants. Rounds interleave the variants so that
background load hits all of them alike; medians over REPS rounds."""
import statistics, sys, time, os
import duckdb

root, reps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
variants = [v for v in ["orig", "uuid_pa", "flba", "str36", "str36_dba"] if os.path.isdir(f"{root}/{v}/usage")]
con = duckdb.connect()
con.execute(f"SET threads = {threads}")
con.execute("SET enable_object_cache = false")
src = lambda v: f"read_parquet('{root}/{v}/usage/**/*.parquet', hive_partitioning = true)"
# one id from the middle of the lake, as text
probe = con.execute(f"SELECT event_id::VARCHAR FROM {src(variants[0])} ORDER BY ts_start LIMIT 1 OFFSET 500000").fetchone()[0] \
    if variants[0] != "flba" else None
def lit(v):
    if v in ("orig", "uuid_pa"):
        return f"'{probe}'::UUID"
    if v == "flba":
        return f"from_hex('{probe.replace('-', '')}')"
    return f"'{probe}'"
queries = {
    "point lookup": lambda v: f"SELECT count(*) FROM {src(v)} WHERE event_id = {lit(v)}",
    "count distinct": lambda v: f"SELECT count(DISTINCT event_id) FROM {src(v)}",
    "lookup+cast text": lambda v: f"SELECT count(*) FROM {src(v)} WHERE event_id::VARCHAR = '{probe}'" if v != "flba"
        else f"SELECT count(*) FROM {src(v)} WHERE lower(hex(event_id)) = '{probe.replace('-', '')}'",
}
times = {(q, v): [] for q in queries for v in variants}
answers = {}
for q, f in queries.items():       # warm-up + answers
    for v in variants:
        answers[(q, v)] = con.execute(f(v)).fetchone()[0]
for _ in range(reps):
    for q, f in queries.items():
        for v in variants:
            t = time.perf_counter(); con.execute(f(v)).fetchone(); times[(q, v)].append(time.perf_counter() - t)
print(f"duckdb {duckdb.__version__}, threads={threads}, {reps} rounds, probe id {probe}")
base = variants[0]
for q in queries:
    b = statistics.median(times[(q, base)])
    for v in variants:
        ts = times[(q, v)]; m = statistics.median(ts)
        print(f"{q:<17} {v:<10} median {m*1000:8.1f} ms  min {min(ts)*1000:8.1f}  max {max(ts)*1000:8.1f}  x{m/b:5.2f} vs {base}  answer={answers[(q, v)]}")
