#!/usr/bin/env python3
"""The house rules the layout keeps, checked on every test run:

- no file over 600 lines before its tests (`#[cfg(test)]`);
- no import circle between the files of a crate: a file never uses, through
  `crate::` or `super::` paths, a file that uses it back, directly or round
  a longer loop.

Prints each breach and exits 1 if there is one.
"""
import os
import re
import sys

MAX_LINES = 600
CRATES = ["collector/src", "ingest/src", "lake/src", "query/src", "schemas/src", "spool/src", "src"]


def modules(root):
    """Module path (`proxy::attempt`) -> file, for one crate's source tree."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(d, f)
            rel = os.path.relpath(path, root)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            out["::".join(rel)] = path
    return out


def code(path):
    return open(path, encoding="utf-8").read().split("#[cfg(test)]")[0]


def paths(src, base):
    """Every path after `base::` in `src`, groups (`base::{a::b, c}`) spread out."""
    out = []
    for x in re.findall(r"\b" + base + r"::([a-z_][a-z0-9_:]*)", src):
        out.append([p for p in x.split("::") if p])
    for head, group in re.findall(r"\b" + base + r"::((?:[a-z_][a-z0-9_]*::)*)\{([^}]*)\}", src):
        lead = [p for p in head.split("::") if p]
        for item in group.split(","):
            item = item.strip().split(" as ")[0]
            parts = [p for p in item.split("::") if p and p != "self" and not p.startswith("{")]
            out.append(lead + parts)
    return out


def edges(mods):
    def resolve(parts):
        for i in range(len(parts), 0, -1):
            m = "::".join(parts[:i])
            if m in mods:
                return m
        return None

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        src = code(path)
        here = m.split("::") if m else []
        parent = here[:-1]  # what `super` names, from a file or a mod.rs
        for base, prefix in (("crate", []), ("super", parent)):
            for x in paths(src, base):
                t = resolve(prefix + x)
                if t is not None and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph):
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    breaches = []
    for crate in CRATES:
        mods = modules(os.path.join(root, crate))
        for m, path in sorted(mods.items()):
            lines = code(path).count("\n")
            if lines > MAX_LINES:
                breaches.append(f"{os.path.relpath(path, root)}: {lines} lines before its tests (at most {MAX_LINES})")
        for comp in cycles(edges(mods)):
            breaches.append(f"{crate}: import circle between " + ", ".join(c or "lib" for c in comp))
    for b in breaches:
        print(b)
    if breaches:
        sys.exit(1)
    print(f"layout: no file over {MAX_LINES} lines, no import circle in {len(CRATES)} crates")


if __name__ == "__main__":
    main()
