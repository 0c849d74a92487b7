"""The table every bench section prints: rows of (measurement, skuvision, reference, ratio, target)."""

from __future__ import annotations

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
