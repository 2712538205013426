"""Amazon 2014 adapter: reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz (McAuley et al.).

Lines are Python literals (single quotes), parsed with `ast.literal_eval` (never `eval`); strict
JSON lines take the faster `json.loads` path. text = title + categories + brand (paper §5.1.1);
categories = every name in the item's category paths; image = a local file
`<image_dir>/<asin>.*` or the `imUrl` (downloaded later by `features.download`).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from data_pipelines.canonical import CanonicalData, ChunkedRead, RowBuffer, TimestampCheck, items_frame
from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError, DropLog
from data_pipelines.sources.common import numbered_lines, require

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


def parse_record(line: str) -> dict:
    """One record; ValueError/SyntaxError when it is neither JSON nor a Python literal dict."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = ast.literal_eval(line)
    if not isinstance(record, dict):
        raise ValueError(f"expected a dict, got {type(record).__name__}")
    return record


def category_names(raw: object) -> list[str]:
    """Flatten `categories` (a list of category paths) to unique names, first-seen order."""
    names: list[str] = []
    if isinstance(raw, list):
        for path in raw:
            for name in (path if isinstance(path, list) else [path]):
                if isinstance(name, str) and name.strip() and name.strip() not in names:
                    names.append(name.strip())
    return names


def item_text(record: dict, categories: list[str]) -> str:
    parts = [str(record.get("title") or "").strip(), ", ".join(categories),
             str(record.get("brand") or "").strip()]
    return ". ".join(p for p in parts if p)


def local_images(image_dir: str) -> dict[str, str]:
    if not image_dir:
        return {}
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    return {p.stem: str(p) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


def resolve(cfg: PrepConfig) -> tuple[str, Path, Path]:
    """(category, reviews file, meta file)."""
    root = Path(cfg.input_dir)
    if not cfg.category:
        found = sorted(root.glob("reviews_*_5.json.gz"))
        if len(found) != 1:
            raise DataError(f"{root}: give --category; found {[p.name for p in found]}")
        cat = found[0].name[len("reviews_"): -len("_5.json.gz")]
    else:
        cat = cfg.category
    return (cat, require(root / f"reviews_{cat}_5.json.gz", "reviews file"),
            require(root / f"meta_{cat}.json.gz", "metadata file"))


def files(cfg: PrepConfig) -> list[Path]:
    return list(resolve(cfg)[1:])


def read(cfg: PrepConfig) -> ChunkedRead:
    cat, reviews, meta = resolve(cfg)
    drops = DropLog(strict=cfg.strict)
    check = TimestampCheck(drops, cfg.max_future_seconds)
    counted = {"rows": 0}
    wanted: set[str] = set()     # the reviewed items: their metadata is read, no other (O(items))

    def frames():
        rows = RowBuffer()
        for number, line in numbered_lines(reviews, progress=cfg.progress):
            counted["rows"] += 1
            where = f"{reviews}:{number}"
            try:
                record = parse_record(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
                drops.drop("malformed_line", where, f"not a JSON or Python-literal dict ({exc})")
                continue
            user, asin = record.get("reviewerID"), record.get("asin")
            if not user or not asin:
                field = "reviewerID" if not user else "asin"
                drops.drop("missing_field", where, f"field {field!r} is missing")
                continue
            ts = check(record.get("unixReviewTime"), where, "unixReviewTime")
            if ts is not None:
                rows.add(str(user), str(asin), ts)
                wanted.add(str(asin))
                if rows.full:
                    yield rows.frame()
        yield rows.frame()

    def finish() -> CanonicalData:
        images = local_images(cfg.image_dir)
        ids, texts, cats, refs = [], [], [], []
        for number, line in numbered_lines(meta, progress=cfg.progress):
            try:
                record = parse_record(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
                drops.drop("malformed_meta_line", f"{meta}:{number}", f"not a dict literal ({exc})")
                continue
            asin = record.get("asin")
            if not asin or asin not in wanted:
                continue  # metadata of items nobody reviewed: not needed
            names = category_names(record.get("categories"))
            ids.append(str(asin))
            texts.append(item_text(record, names))
            cats.append(names)
            refs.append(images.get(str(asin)) or record.get("imUrl") or None)
        return CanonicalData("amazon2014", cfg.name or cat.lower(), None, items_frame(ids, texts, cats, refs),
                             [reviews, meta], counted["rows"], drops)

    return ChunkedRead(frames(), finish)


def load(cfg: PrepConfig) -> CanonicalData:
    return read(cfg).whole()
