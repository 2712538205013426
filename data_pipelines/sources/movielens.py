"""MovieLens adapter: ml-100k (u.data, u.item, u.genre) and ml-1m (ratings.dat, movies.dat).

text = title + genres; categories = genres (multi-label). No images. Files are latin-1.
"""

from __future__ import annotations

from pathlib import Path

from data_pipelines.canonical import CanonicalData, ChunkedRead, RowBuffer, TimestampCheck, items_frame
from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError, DropLog
from data_pipelines.sources.common import numbered_lines, require

ENCODING = "latin-1"


def _ratings(path: Path, sep: str, cfg: PrepConfig, drops: DropLog, counted: dict):
    """Canonical frames of the ratings file, `CHUNK_ROWS` valid rows at a time; lines read go to
    `counted["rows"]`."""
    check = TimestampCheck(drops, cfg.max_future_seconds)
    rows = RowBuffer()
    for number, line in numbered_lines(path, ENCODING, cfg.progress):
        counted["rows"] += 1
        where = f"{path}:{number}"
        parts = line.split(sep)
        if len(parts) != 4 or not parts[0].strip() or not parts[1].strip():
            drops.drop("malformed_line", where, f"expected user{sep}item{sep}rating{sep}timestamp, "
                       f"got {len(parts)} fields: {line[:80]!r}")
            continue
        ts = check(parts[3].strip(), where)
        if ts is None:
            continue
        rows.add(parts[0].strip(), parts[1].strip(), ts)
        if rows.full:
            yield rows.frame()
    yield rows.frame()


def _genres_100k(path: Path) -> list[str]:
    names = []
    for number, line in numbered_lines(path, ENCODING, progress=False):
        name, _, index = line.partition("|")
        if not index.strip().isdigit() or int(index) != len(names):
            raise DataError(f"{path}:{number}: expected 'name|{len(names)}', got {line!r}")
        names.append(name)
    return names


def _items_100k(path: Path, genres: list[str], drops: DropLog):
    ids, texts, cats = [], [], []
    for number, line in numbered_lines(path, ENCODING, progress=False):
        parts = line.split("|")
        flags = parts[5:]
        if len(parts) != 5 + len(genres) or any(f not in ("0", "1") for f in flags):
            drops.drop("malformed_item_line", f"{path}:{number}",
                       f"expected 5 fields + {len(genres)} genre flags, got {len(parts)} fields")
            continue
        item_genres = [g for g, f in zip(genres, flags) if f == "1"]
        ids.append(parts[0].strip())
        texts.append(" ".join([parts[1].strip(), ", ".join(item_genres)]).strip())
        cats.append(item_genres)
    return items_frame(ids, texts, cats, [None] * len(ids))


def _items_1m(path: Path, drops: DropLog):
    ids, texts, cats = [], [], []
    for number, line in numbered_lines(path, ENCODING, progress=False):
        parts = line.split("::")
        if len(parts) != 3:
            drops.drop("malformed_item_line", f"{path}:{number}",
                       f"expected id::title::genres, got {len(parts)} fields")
            continue
        item_genres = [g for g in parts[2].split("|") if g]
        ids.append(parts[0].strip())
        texts.append(" ".join([parts[1].strip(), ", ".join(item_genres)]).strip())
        cats.append(item_genres)
    return items_frame(ids, texts, cats, [None] * len(ids))


def read(cfg: PrepConfig) -> ChunkedRead:
    root = Path(cfg.input_dir)
    drops = DropLog(strict=cfg.strict)
    counted = {"rows": 0}
    if (root / "u.data").is_file():
        files = [require(root / "u.data", "ratings"), require(root / "u.item", "item table"),
                 require(root / "u.genre", "genre names")]
        sep, name = "\t", "ml-100k"
    elif (root / "ratings.dat").is_file():
        files = [require(root / "ratings.dat", "ratings"), require(root / "movies.dat", "movie table")]
        sep, name = "::", "ml-1m"
    else:
        raise DataError(f"{root}: neither u.data (ml-100k) nor ratings.dat (ml-1m) found")

    def finish() -> CanonicalData:
        if name == "ml-100k":
            genres = _genres_100k(files[2])
            items = _items_100k(files[1], genres, drops)
        else:
            items = _items_1m(files[1], drops)
            genres = sorted({g for gs in items["categories"] for g in gs})
        return CanonicalData("movielens", cfg.name or name, None, items, files, counted["rows"], drops, genres)

    return ChunkedRead(_ratings(files[0], sep, cfg, drops, counted), finish)


def load(cfg: PrepConfig) -> CanonicalData:
    return read(cfg).whole()


def files(cfg: PrepConfig) -> list[Path]:
    root = Path(cfg.input_dir)
    if (root / "u.data").is_file():
        names: tuple[str, ...] = ("u.data", "u.item", "u.genre")
    elif (root / "ratings.dat").is_file():
        names = ("ratings.dat", "movies.dat")
    else:
        raise DataError(f"{root}: neither u.data (ml-100k) nor ratings.dat (ml-1m) found")
    return [require(root / n, "input file") for n in names]
