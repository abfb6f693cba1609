"""Tables: rich on a terminal, tab-separated plain text when piped (one owner for both commands)."""
from __future__ import annotations

import sys
from typing import List, Optional


def print_table(title: str, headers: List[str], rows: List[List[str]], console=None,
                styles: Optional[List[Optional[str]]] = None) -> None:
    """A rich table on a terminal; tab-separated plain text (header first) when piped."""
    from rich.console import Console

    console = console or Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        out = sys.stdout
        out.write("\t".join(headers) + "\n")
        for r in rows:
            out.write("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in r) + "\n")
        out.flush()
        return
    console.print(rich_table(title, headers, rows, styles))


def rich_table(title, headers, rows, styles=None):
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for h in headers:
        table.add_column(h, overflow="fold")
    for i, r in enumerate(rows):
        table.add_row(*[str(c) for c in r], style=(styles[i] if styles else None))
    return table
