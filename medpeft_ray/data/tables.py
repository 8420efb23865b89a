"""Reading the publishers' CSV files: one reader, errors that name the file, the row and the column."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

from medpeft_ray.errors import DataError


def read_csv(csv: Path, required: tuple[str, ...] = ()) -> Any:  # -> pandas.DataFrame
    """The CSV as strings (blank cells stay ""), checked for the ``required`` columns.

    Raises:
        DataError: the file is missing, unreadable, or lacks a required column.
    """
    import pandas as pd

    if not csv.is_file():
        raise DataError(f"{csv}: file not found")
    try:
        # index_col=False: rows with a trailing comma (an extra unnamed field) must not shift the
        # first column into the index; pandas warns that it drops that empty field, which is wanted.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            frame = pd.read_csv(
                csv, dtype=str, keep_default_na=False, index_col=False, skipinitialspace=True, encoding="utf-8-sig"
            )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise DataError(f"{csv}: not a readable CSV ({type(exc).__name__}: {message})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{csv}: no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(frame.columns) or 'none'})"
        )
    return frame


def csv_rows(csv: Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row number, row)`` pairs, numbered as in a spreadsheet (the header is row 1)."""
    frame = read_csv(csv, required)
    for number, row in enumerate(frame.to_dict(orient="records"), start=2):
        yield number, {k: str(v) for k, v in row.items()}
