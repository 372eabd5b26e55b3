"""Bytes per event of a lake (whole files) and of its event_id column (compressed and
not), from the Parquet footers. Usage: sizes.py LAKE_ROOT..."""
import glob, os, sys
import pyarrow.parquet as pq
print(f"{'lake':<28}{'files':>6}{'rows':>9}{'file bytes':>12}{'B/event':>9}{'event_id B':>12}{'id B/ev':>9}{'id uncompr B/ev':>16}")
for root in sys.argv[1:]:
    fs = sorted(glob.glob(f"{root}/usage/**/*.parquet", recursive=True))
    rows = size = idc = idu = 0
    for f in fs:
        md = pq.ParquetFile(f).metadata
        rows += md.num_rows; size += os.path.getsize(f)
        for r in range(md.num_row_groups):
            c = md.row_group(r).column(0)
            assert c.path_in_schema == "event_id"
            idc += c.total_compressed_size; idu += c.total_uncompressed_size
    print(f"{root:<28}{len(fs):>6}{rows:>9}{size:>12}{size/rows:>9.2f}{idc:>12}{idc/rows:>9.2f}{idu/rows:>16.2f}")
