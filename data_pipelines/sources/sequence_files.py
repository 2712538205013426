"""Sequence-file adapter: `<Name>_item.txt` (`user item_1 ... item_n`) + `<Name>_time.txt`
(`user t_1 ... t_n`), the same users in the same order (e.g. amazon-beauty). IDs and times only."""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path

from data_pipelines.canonical import CanonicalData, ChunkedRead, RowBuffer, TimestampCheck
from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError, DropLog
from data_pipelines.sources.common import numbered_lines, require


def find_pair(root: Path) -> tuple[Path, Path]:
    items = sorted(root.glob("*_item.txt"))
    if len(items) != 1:
        raise DataError(f"{root}: expected exactly one *_item.txt, found {[p.name for p in items]}")
    times = require(items[0].with_name(items[0].name[: -len("_item.txt")] + "_time.txt"),
                    "matching *_time.txt")
    return items[0], times


def read(cfg: PrepConfig) -> ChunkedRead:
    item_path, time_path = find_pair(Path(cfg.input_dir))
    drops = DropLog(strict=cfg.strict)
    check = TimestampCheck(drops, cfg.max_future_seconds)
    counted = {"rows": 0}

    def frames():
        rows = RowBuffer()
        item_lines = numbered_lines(item_path, progress=cfg.progress)
        time_lines = numbered_lines(time_path, progress=False)
        # zip_longest, not zip: zip would take the longer file's next line before finding the other
        # file ended, and that user would vanish unreported
        for pair_i, pair_t in zip_longest(item_lines, time_lines):
            if pair_i is None or pair_t is None:
                (n, line), longer, shorter = ((pair_i, item_path, time_path) if pair_t is None
                                              else (pair_t, time_path, item_path))
                raise DataError(f"{longer}:{n}: user {line.split()[0]!r} has no line in {shorter} "
                                "(the files list different numbers of users)")
            (n_i, line_i), (n_t, line_t) = pair_i, pair_t
            a, b = line_i.split(), line_t.split()
            where_i, where_t = f"{item_path}:{n_i}", f"{time_path}:{n_t}"
            counted["rows"] += max(len(a) - 1, 0)
            if a[0] != b[0]:
                raise DataError(f"{where_i} / {where_t}: user {a[0]!r} vs {b[0]!r}: the two files "
                                "must list the same users in the same order")
            if len(a) != len(b):
                drops.drop("malformed_line", where_t, f"{len(a) - 1} items but {len(b) - 1} timestamps "
                           f"for user {a[0]!r}; the user's {len(a) - 1} rows are dropped", n=len(a) - 1)
                continue
            for position, (item, raw) in enumerate(zip(a[1:], b[1:]), start=1):
                ts = check(raw, f"{where_t} (user {a[0]}, position {position})")
                if ts is not None:
                    rows.add(a[0], item, ts)
            if rows.full:
                yield rows.frame()
        yield rows.frame()

    def finish() -> CanonicalData:
        name = cfg.name or item_path.name[: -len("_item.txt")].lower()
        return CanonicalData("sequence", name, None, None, [item_path, time_path], counted["rows"], drops)

    return ChunkedRead(frames(), finish)


def load(cfg: PrepConfig) -> CanonicalData:
    return read(cfg).whole()


def files(cfg: PrepConfig) -> list[Path]:
    return list(find_pair(Path(cfg.input_dir)))
