"""Writes one benchmark's section of BENCHMARKS.md, leaving the others."""

import re

HEADER = "# Benchmarks\n\nEach section is written by its own run of `scripts/bench.sh` (see its top).\n"


def write_section(name, text, path="BENCHMARKS.md"):
    try:
        doc = open(path).read()
    except FileNotFoundError:
        doc = HEADER
    if not doc.startswith("# Benchmarks\n\nEach section"):
        doc = HEADER  # an older single-section file: start over
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in doc:
        doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    open(path, "w").write(doc)
