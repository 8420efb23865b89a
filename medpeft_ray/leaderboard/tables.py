"""Leaderboard tables that fit the terminal: a DataFrame of display text in, a rich ``Table`` out.

Rich shrinks a too-wide table by cutting every cell (``0.…``, ``lo…``), which leaves nothing to
compare. Here the widths are chosen before rich sees the table:

- columns of priority 0 always get the width of their longest value, so they are never cut;
- a column marked ``lift`` whose value is the same on every row moves to the title line
  (``experiment x · dataset y``): on a filtered leaderboard it would repeat one value per row;
- ``fold`` columns (hyperparameters, long names) wrap onto several lines instead of being cut;
- the other columns are added most important first (lowest priority number) while they fit,
  and the caption names those left out.

Every width is set explicitly, and cells fold rather than end in ``…`` if even the columns that
must be shown are wider than the terminal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich import box
from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    import pandas as pd

#: A folding column narrower than this would spread one value over too many lines to read.
MIN_FOLD_WIDTH = 12
#: A folding column is kept wide enough for its longest word (``weight_decay=0.0123``) up to this
#: width, so that a value breaks between words rather than inside one.
MAX_WORD_WIDTH = 24
#: The space between two columns: no vertical rules, so that 80 columns hold the six compared ones
#: and the hyperparameters (a boxed table spends three characters per column on rules and padding).
GAP = 2


@dataclass(frozen=True)
class Column:
    """How one column of the text frame is shown."""

    name: str
    header: str
    right: bool = False  # right-justified (numbers)
    fold: bool = False  # may wrap onto several lines; else shown at its longest value's width
    priority: float = 0  # 0: always shown; of the others, the highest number is left out first
    lift: bool = False  # moves to the title line when it has one value on every row


def _longest_word(text: str) -> int:
    return max((cell_len(word) for word in re.split(r"\s+", text) if word), default=0)


def _widths(column: Column, values: Iterable[str]) -> tuple[int, int]:
    """(the narrowest width that shows it uncut, the width that shows every value on one line)."""
    values = list(values)
    longest = max((cell_len(v) for v in values), default=0)
    natural = max(longest, cell_len(column.header))
    header_words = _longest_word(column.header)
    if column.fold:
        words = min(max((_longest_word(v) for v in values), default=0), MAX_WORD_WIDTH)
        return min(natural, max(MIN_FOLD_WIDTH, header_words, words)), natural
    # a header wraps at its spaces ("trainable params" on two lines); a value never does
    return max(longest, header_words), natural


def _span(widths: Sequence[int]) -> int:
    return sum(widths) + GAP * max(len(widths) - 1, 0)


def lifted_values(text: pd.DataFrame, columns: Sequence[Column]) -> dict[str, str]:
    """The ``lift`` columns that hold one value on every row, with that value."""
    return {c.name: str(text[c.name].iloc[0]) for c in columns
            if c.lift and len(text) > 0 and text[c.name].nunique(dropna=False) == 1}


def fit_table(text: pd.DataFrame, columns: Sequence[Column], width: int, *, title: str,
              explicit: bool = False) -> Table:
    """``text`` (one string per cell) as a table at most ``width`` characters wide where possible.

    ``columns`` are in display order. With ``explicit`` (the user chose them), every column is shown
    and none moves to the title.
    """
    lifted = {} if explicit else lifted_values(text, columns)
    candidates = [c for c in columns if c.name not in lifted]
    ranges = {c.name: _widths(c, text[c.name]) for c in candidates}
    if explicit:
        shown = list(candidates)
    else:
        shown = [c for c in candidates if c.priority == 0]
        # most important first; a wide column that does not fit may leave room for a narrow one
        for column in sorted((c for c in candidates if c.priority != 0), key=lambda c: c.priority):
            if _span([ranges[c.name][0] for c in (*shown, column)]) <= width:
                shown.append(column)
        shown = [c for c in candidates if c in shown]
    widths = {c.name: ranges[c.name][0] for c in shown}
    spare = width - _span(list(widths.values()))
    # spare room goes first to folding columns (fewer lines per row), then to wrapped headers
    for group in ([c for c in shown if c.fold], [c for c in shown if not c.fold]):
        while spare > 0:
            short = [c for c in group if widths[c.name] < ranges[c.name][1]]
            if not short:
                break
            widest_need = max(short, key=lambda c: ranges[c.name][1] - widths[c.name])
            widths[widest_need.name] += 1
            spare -= 1

    hidden = [c.header for c in candidates if c not in shown]
    heading = title
    if lifted:
        heading += "\n" + " · ".join(f"{_header_of(columns, name)} {value}" for name, value in lifted.items())
    # the one-space column rule and one space of right padding make the GAP
    # rows that wrap onto several lines are told apart by a blank line between them
    wraps = any(cell_len(str(v)) > widths[c.name] for c in shown if c.fold for v in text[c.name])
    table = Table(title=escape(heading), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, GAP - 1, 0, 0), show_lines=wraps)
    for column in shown:
        table.add_column(escape(column.header), justify="right" if column.right else "left",
                         width=widths[column.name], overflow="fold")
    for row in text[[c.name for c in shown]].itertuples(index=False):
        table.add_row(*(escape(str(cell)) for cell in row))  # a value like "[q, v]" is text, not rich markup
    if hidden:
        table.caption = escape(f"not shown at {width} columns: {', '.join(hidden)} (choose with --columns)")
    return table


def _header_of(columns: Sequence[Column], name: str) -> str:
    return next(c.header for c in columns if c.name == name)
