"""The row rule of a tabular log (`checked_row`) applied to chunks of a table, vectorised: used by
every reader of one (the Ray Data read tasks, the streaming preparation).

A vectorised fast path accepts only values the row rule would accept unchanged; any other row goes
through the row rule itself, so drops, their reasons and their examples (`file:row N`) are the
row rule's, however the table is cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from data_pipelines.canonical import TimestampCheck
from data_pipelines.config import PrepConfig
from data_pipelines.report import DropLog

DIGITS = r"[0-9]{1,15}"  # whole seconds/ms parsed exactly by int() and by astype(int64)


def checked_row(u, i, t, where: str, cfg: PrepConfig, drops: DropLog, check: TimestampCheck):
    """The row rule of a tabular log, shared by every reader of it: (user, item, unix seconds) of a
    valid row, or None with the drop counted (`missing_field`, or the timestamp's reason)."""
    if u is None or i is None or str(u) == "" or str(i) == "":
        drops.drop("missing_field", where, f"empty {cfg.user_col!r} or {cfg.item_col!r}")
        return None
    ts = check(t, where, cfg.time_col)
    return None if ts is None else (str(u), str(i), ts)


def checked_frames(frames, cfg: PrepConfig, path: Path, unit: float, drops: DropLog,
                   row0: int = 0) -> Iterator[tuple[pd.DataFrame, int]]:
    """(canonical frame of the chunk's valid rows, data rows seen so far incl. `row0`) per chunk;
    `row0` is the number of data rows before the first chunk (row numbers in examples are 1-based)."""
    check = TimestampCheck(drops, cfg.max_future_seconds, unit)
    for df in frames:
        times = df[cfg.time_col]
        chk = check
        if pd.api.types.is_datetime64_any_dtype(times):  # datetimes -> unix seconds (UTC)
            times = times.map(lambda t: None if pd.isna(t) else int(pd.Timestamp(t).timestamp()))
            chk = TimestampCheck(drops, cfg.max_future_seconds)
        users, ok_u = _fast_ids(df[cfg.user_col])
        items, ok_i = _fast_ids(df[cfg.item_col])
        stamps, ok_t = _fast_times(times, chk)
        ok = ok_u & ok_i & ok_t
        if not ok.all():  # the row rule, in row order, for every other row
            u_raw, i_raw, t_raw = (df[cfg.user_col].to_numpy(object), df[cfg.item_col].to_numpy(object),
                                   times.to_numpy(object))
            keep = ok.copy()
            for r in np.flatnonzero(~ok):
                u, i, t = u_raw[r], i_raw[r], t_raw[r]
                row = checked_row(u, i, t, f"{path}:row {row0 + r + 1}", cfg, drops, chk)
                if row is not None:
                    (users[r], items[r], stamps[r]), keep[r] = row, True
            users, items, stamps = users[keep], items[keep], stamps[keep]
        row0 += len(df)
        yield pd.DataFrame({"user": users, "item": items, "timestamp": stamps.astype(np.int64)}), row0
def _fast_ids(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(str values, mask of rows whose value is a non-empty str or an int: kept as str(v))."""
    if pd.api.types.is_integer_dtype(col.dtype):
        return col.astype(str).to_numpy(object), np.ones(len(col), dtype=bool)
    values = col.to_numpy(object)
    ok = np.fromiter((type(v) is str and v != "" for v in values), dtype=bool, count=len(values))
    return values.copy(), ok


def _fast_times(col: pd.Series, check: TimestampCheck) -> tuple[np.ndarray, np.ndarray]:
    """(int64 seconds, mask of rows the row check would accept with exactly that value)."""
    out = np.zeros(len(col), dtype=np.int64)
    if pd.api.types.is_integer_dtype(col.dtype) and not col.hasnans:  # Int64 with <NA>: row check
        raw = col.to_numpy(np.int64)
        out = raw if check.unit == 1.0 else (raw / check.unit).astype(np.int64)
    elif pd.api.types.is_string_dtype(col.dtype) or col.dtype == object:
        text = col.astype(object).where(col.map(type) == str, "")  # non-str -> the row check
        digits = text.str.fullmatch(DIGITS).fillna(False).to_numpy(bool)
        raw = np.zeros(len(col), dtype=np.int64)
        raw[digits] = text[digits].astype(np.int64).to_numpy()
        out = raw if check.unit == 1.0 else (raw / check.unit).astype(np.int64)
        return out, digits & (out >= 0) & (out <= check.max_ts)
    else:
        return out, np.zeros(len(col), dtype=bool)
    return out, (out >= 0) & (out <= check.max_ts)
