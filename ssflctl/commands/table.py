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


class AlignedRows:
    """Many rows as aligned columns for a terminal, laid out in one pass: a rich renderable (print
    it, or hand it to ``Live``) that costs microseconds a row where rich's Table, which measures
    every cell, costs about 1.6 ms. Columns that are empty in every row are left out; a column is
    at most ``max_col`` cells wide (longer text is cut with '…'), except the first (run ids stay
    whole) and the last, which takes the width that is left and wraps under itself (on a narrow
    terminal it goes on its own indented lines). ``styles``: a rich style per row (the whole
    line); ``headings``: {row index: a line printed before that row}."""

    def __init__(self, headers: List[str], rows: List[List[str]], styles: Optional[List[Optional[str]]] = None,
                 headings: Optional[dict] = None, max_col: int = 40):
        self.headers = [str(h) for h in headers]
        n = len(self.headers)  # a short row is padded, so every row has every column
        self.rows = [[str(c).replace("\n", " ").replace("\t", " ") for c in r] + [""] * (n - len(r)) for r in rows]
        self.styles = styles or [None] * len(self.rows)
        self.headings = headings or {}
        self.max_col = max_col

    def _widths(self):
        """(kept column indices but the last, their widths, the last kept column)."""
        from rich.cells import cell_len

        keep = [j for j in range(len(self.headers)) if j == 0 or any(r[j] for r in self.rows)]
        widths = []
        for j in keep[:-1]:
            w = max([cell_len(self.headers[j])] + [cell_len(r[j]) for r in self.rows])
            widths.append(w if j == 0 else min(w, self.max_col))
        return keep[:-1], widths, keep[-1]

    def __rich_console__(self, console, options):
        from rich.cells import cell_len
        from rich.segment import Segment
        from rich.style import Style

        width = max(20, options.max_width)
        cols, widths, last = self._widths()
        head_w = sum(widths) + 2 * max(0, len(widths) - 1)
        room = width - head_w - (2 if widths else 0)
        own_line = room < 24  # too narrow for the last column beside the others: below each row
        indent = " " * (width - room) if not own_line else "    "
        parsed = {}

        def style_of(name):
            if name not in parsed:
                parsed[name] = Style.parse(name) if name else Style()
            return parsed[name]

        def fit(text, w):
            n = cell_len(text)
            if n <= w:
                return text + " " * (w - n)
            out = ""
            for ch in text:
                if cell_len(out + ch) > w - 1:
                    break
                out += ch
            return out + "…" + " " * (w - 1 - cell_len(out))

        def line(cells, tail, style):
            head = "  ".join(fit(c, w) for c, w in zip(cells, widths))
            parts = wrap(tail, width - 4 if own_line else room)
            if own_line:
                yield Segment(head.rstrip(), style)
                yield Segment.line()
            else:
                first = parts.pop(0) if parts else ""
                yield Segment(((head + "  " if widths else "") + first) if first else head.rstrip(), style)
                yield Segment.line()
            for part in parts:
                yield Segment(indent + part, style)
                yield Segment.line()

        bold = style_of("bold")
        yield from line([self.headers[j] for j in cols], self.headers[last], bold)
        for i, r in enumerate(self.rows):
            if i in self.headings:
                yield Segment(str(self.headings[i]), bold)
                yield Segment.line()
            yield from line([r[j] for j in cols], r[last], style_of(self.styles[i] if i < len(self.styles) else None))


def wrap(text: str, width: int) -> List[str]:
    """Greedy word wrap by terminal cells (words longer than ``width`` are split)."""
    from rich.cells import cell_len

    if not text:
        return []
    width = max(1, width)
    if cell_len(text) <= width:
        return [text]
    lines, cur = [], ""
    for word in text.split(" "):
        while cell_len(word) > width:
            if cur:
                lines.append(cur)
                cur = ""
            cut = word[:width]
            while cell_len(cut) > width:
                cut = cut[:-1]
            lines.append(cut)
            word = word[len(cut):]
        cand = f"{cur} {word}" if cur else word
        if cell_len(cand) <= width:
            cur = cand
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    return lines
