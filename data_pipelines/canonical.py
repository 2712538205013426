"""The canonical form every source adapter produces, and the row checks they share.

interactions: DataFrame[user: str, item: str, timestamp: int64 unix seconds], in input order.
items (optional): DataFrame[item: str, text: str, categories: list[str], image: str | None],
where `image` is a local path or URL; `None` when the source has no item metadata at all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from data_pipelines.report import DropLog


@dataclass
class CanonicalData:
    source: str
    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame | None
    inputs: list[Path]
    rows_read: int
    drops: DropLog
    category_names: list[str] = field(default_factory=list)  # fixed order when the source has one


class TimestampCheck:
    """Parses one raw timestamp; returns int seconds or None after a counted drop."""

    def __init__(self, drops: DropLog, max_future_seconds: int, unit_seconds: float = 1.0):
        self.drops = drops
        self.max_ts = int(time.time()) + int(max_future_seconds)
        self.unit = unit_seconds

    def __call__(self, raw: object, where: str, field_name: str = "timestamp") -> int | None:
        if raw is None or (isinstance(raw, float) and math.isnan(raw)) or raw == "":
            self.drops.drop("missing_timestamp", where, f"field {field_name!r} is missing")
            return None
        try:
            value = raw
            if isinstance(raw, str):
                try:
                    value = int(raw.strip())      # exact for any integer string
                except ValueError:
                    value = float(raw.strip())
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise ValueError
                if self.unit == 1.0 and value != int(value):
                    raise ValueError
            ts = int(value / self.unit) if self.unit != 1.0 else int(value)
        except (TypeError, ValueError, OverflowError):
            self.drops.drop("bad_timestamp", where, f"field {field_name!r} is not a whole number "
                            f"of seconds: {raw!r}")
            return None
        if ts < 0:
            self.drops.drop("negative_timestamp", where, f"field {field_name!r} = {ts} < 0")
            return None
        if ts > self.max_ts:
            self.drops.drop("future_timestamp", where, f"field {field_name!r} = {ts} is in the "
                            "future")
            return None
        return ts


CHUNK_ROWS = 1 << 18        # valid rows per frame a folder source's chunked read yields (about)


@dataclass
class ChunkedRead:
    """A folder source read in pieces: `frames` yields canonical interaction frames of about
    `CHUNK_ROWS` rows (a sequence file's line stays in one frame), in input order, counting its drops into `drops` as it goes; `finish()`,
    called after the last frame, gives everything else (`interactions` None): the item table,
    name, inputs and rows read. A read task so holds one frame and the item table, not the log."""

    frames: Iterator[pd.DataFrame]
    finish: Callable[[], "CanonicalData"]

    def whole(self) -> "CanonicalData":
        """The CanonicalData of the whole log (what `load_source` returns)."""
        frames = list(self.frames)
        data = self.finish()
        data.interactions = (pd.concat(frames, ignore_index=True) if len(frames) > 1 else
                             frames[0] if frames else interactions_frame([], [], []))
        return data


class RowBuffer:
    """The valid rows of a chunked read: `add` one, `full` when a frame's worth is held, `frame()`
    hands them over as a canonical frame and starts again."""

    def __init__(self):
        self.users: list = []
        self.items: list = []
        self.stamps: list = []

    def add(self, user: str, item: str, ts: int) -> None:
        self.users.append(user)
        self.items.append(item)
        self.stamps.append(ts)

    @property
    def full(self) -> bool:
        return len(self.users) >= CHUNK_ROWS

    def frame(self) -> pd.DataFrame:
        out = interactions_frame(self.users, self.items, self.stamps)
        self.users, self.items, self.stamps = [], [], []
        return out


def interactions_frame(users: list, items: list, stamps: list) -> pd.DataFrame:
    return pd.DataFrame({"user": pd.Series(users, dtype=str), "item": pd.Series(items, dtype=str),
                         "timestamp": pd.Series(stamps, dtype="int64")})


def items_frame(ids: list, texts: list, categories: list, images: list) -> pd.DataFrame:
    # object dtype keeps None as None (pandas 3 would infer a string dtype holding NaN)
    return pd.DataFrame({"item": pd.Series(ids, dtype=str), "text": pd.Series(texts, dtype=object),
                         "categories": pd.Series(categories, dtype=object),
                         "image": pd.Series(images, dtype=object)})
