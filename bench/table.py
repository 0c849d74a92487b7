"""The table every bench section prints: rows of (measurement, skuvision, reference, ratio, target)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

HEADER = ["| measurement | skuvision | reference | ratio | target |", "|---|---|---|---|---|"]


def markdown_rows(rows: list[tuple]) -> list[str]:
    return HEADER + [f"| {' | '.join(str(c) for c in row)} |" for row in rows]


def print_section(rows: list[tuple], notes: list[str]) -> None:
    """A section run on its own (python -m bench.<name>): its rows and notes, as make bench writes them."""
    print("\n".join(markdown_rows(rows) + [""] + [f"- {n}" for n in notes]))


def run_section(bench_rows, description: str, quick_help: str = "smaller sizes") -> None:
    """`python -m bench.<name> [--quick]` for a section that needs nothing but a scratch folder."""
    import argparse
    import tempfile
    from pathlib import Path

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="skuvision-bench-") as workdir:
        rows, notes = bench_rows(Path(workdir), quick=args.quick)
    print_section(rows, notes)


def checkpoint_section_main(doc: str, bench_rows, name: str) -> None:
    """The command line of a section that trains its own checkpoint unless given one (--ckpt)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"skuvision-bench-{name}-"))
    print_section(*bench_rows(workdir, args.quick, args.ckpt))
