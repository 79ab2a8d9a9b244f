"""Print docs/architecture.md's defaults table: every hyperparameter of every method, with its value and source
in each defaults set (edgecp/methods/defaults.py). `--write` replaces the table in docs/architecture.md.

    python tools/defaults_table.py            # print it
    python tools/defaults_table.py --write    # update docs/architecture.md between its markers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- defaults-table:begin -->", "<!-- defaults-table:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the table in docs/architecture.md")
    args = ap.parse_args()
    from edgecp.methods.defaults import markdown

    table = markdown()
    if not args.write:
        print(table, end="")
        return
    doc = ROOT / "docs" / "architecture.md"
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{doc} has no {BEGIN} ... {END} markers: add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n" + table + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
