#!/usr/bin/env python3
"""Prints the tables of one bench run (target/bench/results.json) as markdown.

docs/performance.md quotes one full run; this turns the run's tables into the
page's tables without retyping a number:

    python3 benches/results_md.py [results.json] [section ...]

Sections: the keys of results.json (bexit, w1, w2, w3, w3_qemu, w4, w5, w6,
stall, scaling, goals_table); all of them when none is named.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table(sec: dict) -> str:
    rows = sec["rows"]
    if not rows:
        return "(no rows)"
    head = list(rows[0].keys())

    def cell(v):
        if isinstance(v, float):
            if v != v:
                return "–"
            return f"{v:g}"
        return str(v)

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join(cell(r.get(h, "")) for h in head) + " |")
    return "\n".join(out)


def main() -> int:
    args = sys.argv[1:]
    path = ROOT / "target/bench/results.json"
    if args and args[0].endswith(".json"):
        path = Path(args.pop(0))
    data = json.loads(path.read_text())
    keys = args or [k for k, v in data.items() if isinstance(v, dict) and "rows" in v]
    for k in keys:
        sec = data[k]
        print(f"<!-- {k}: {sec['title']} -->")
        print(table(sec))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
