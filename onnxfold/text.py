"""Plain-text helpers shared by every report: one table layout, one way to quote an error."""

from __future__ import annotations


def table(headers, rows, align="", indent="") -> list:
    """The lines of a table: each column as wide as its widest cell, columns two spaces
    apart, trailing spaces cut. `align` holds '<' (left) or '>' (right) per column; columns
    it does not reach are left-aligned."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(cell) for cell in column) for column in zip(*cells)]
    aligns = align.ljust(len(widths), "<")
    return [(indent + "  ".join(f"{cell:{side}{width}}" for cell, side, width in zip(row, aligns, widths))).rstrip()
            for row in cells]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its class name when it has none): enough to
    say what went wrong in one line on stderr."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
