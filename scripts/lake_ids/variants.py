"""Rewrite a Tollgate lake's usage files with event_id stored differently.

variants:
  uuid_pa  FIXED_LEN_BYTE_ARRAY(16) + UUID logical type (pyarrow rewrite; writer baseline)
  flba     FIXED_LEN_BYTE_ARRAY(16), no logical type (arrow fixed_size_binary(16))
  str36    BYTE_ARRAY String, canonical 36-char text, PLAIN (dictionary off, like the original)
  str36_dba  same, DELTA_BYTE_ARRAY encoding (extra, size only)
Settings copied from ingest/src/lake.rs writer_properties(): zstd(3), page statistics
(-> page index), dictionary off for event_id/request_id/ts_*/cost_*, DELTA_BINARY_PACKED
for ts_start/ts_end, sorting column consumer, row groups <= 1<<20 rows.
"""
import glob, os, sys
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NO_DICT = {"event_id", "request_id", "ts_start", "ts_end", "cost_usd", "cost_saved_usd"}
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def fsb_storage(col: pa.ChunkedArray) -> pa.ChunkedArray:
    chunks = [c.storage if isinstance(c, pa.ExtensionArray) else c for c in col.chunks]
    return pa.chunked_array(chunks, type=pa.binary(16))


def uuid_text(col: pa.ChunkedArray) -> pa.Array:
    raw = fsb_storage(col).combine_chunks()
    n = len(raw)
    b = np.frombuffer(raw.buffers()[1], dtype=np.uint8, count=16 * n).reshape(n, 16)
    h = np.empty((n, 32), dtype=np.uint8)
    h[:, 0::2] = HEX[b >> 4]
    h[:, 1::2] = HEX[b & 15]
    out = np.full((n, 36), ord("-"), dtype=np.uint8)
    out[:, 0:8], out[:, 9:13], out[:, 14:18], out[:, 19:23], out[:, 24:36] = (
        h[:, 0:8], h[:, 8:12], h[:, 12:16], h[:, 16:20], h[:, 20:32])
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))


def convert(table: pa.Table, variant: str) -> pa.Table:
    i = table.schema.get_field_index("event_id")
    col = table.column(i)
    if variant == "uuid_pa":
        return table
    if variant == "flba":
        new, f = fsb_storage(col), pa.field("event_id", pa.binary(16), nullable=False)
    else:
        new, f = uuid_text(col), pa.field("event_id", pa.string(), nullable=False)
    return table.set_column(i, f, new)


def write(table: pa.Table, path: str, variant: str):
    cols = [f.name for f in table.schema]
    enc = {"ts_start": "DELTA_BINARY_PACKED", "ts_end": "DELTA_BINARY_PACKED"}
    if variant == "str36_dba":
        enc["event_id"] = "DELTA_BYTE_ARRAY"
    pq.write_table(
        table, path,
        compression="zstd", compression_level=3,
        use_dictionary=[c for c in cols if c not in NO_DICT],
        column_encoding=enc,
        write_statistics=True, write_page_index=True,
        row_group_size=1 << 20,
        sorting_columns=[pq.SortingColumn(cols.index("consumer"))] if "consumer" in cols else None,
    )


def main(src_lake: str, dst_root: str, variants):
    files = sorted(glob.glob(os.path.join(src_lake, "usage", "**", "*.parquet"), recursive=True))
    for v in variants:
        for f in files:
            rel = os.path.relpath(f, src_lake)
            out = os.path.join(dst_root, v, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            # read_table would also pick up hive columns from the path; read the file alone
            t = pq.ParquetFile(f).read()
            write(convert(t, v), out, v)
        print(v, len(files), "files ->", os.path.join(dst_root, v))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
