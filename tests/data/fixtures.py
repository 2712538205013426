"""Small raw data sets in every supported format, written to a temporary folder.

`LOG` is one ground truth: (user, item, timestamp) rows with duplicates, ties, k-core victims and
enough history for 3-core users; each builder writes it in one raw format plus noise lines.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

BASE = 1_300_000_000


def make_log(seed: int = 0, n_users: int = 14, n_items: int = 9) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        n = rng.randint(3, 9)
        t = BASE + rng.randint(0, 10**6)
        for _ in range(n):
            t += rng.choice([0, 60, 3600, 86400, 7 * 86400])  # 0 gives timestamp ties
            rows.append((f"U{u}", f"I{rng.randint(0, n_items - 1)}", t))
    rows.append(rows[0])          # an exact duplicate
    rows.append(("U99", "I0", BASE))  # a user with one action: removed by k-core
    return rows


def write_amazon(root: Path, log, image_dir: Path | None = None, with_urls: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    items = sorted({i for _, i, _ in log})
    with gzip.open(root / "reviews_Toy_5.json.gz", "wt") as fh:
        for u, i, t in log:  # Python-literal lines (single quotes), as the 2014 dumps
            fh.write(repr({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0}) + "\n")
    with gzip.open(root / "meta_Toy.json.gz", "wt") as fh:
        for n, i in enumerate(items):
            if i == items[-1]:
                continue  # the last item has no metadata
            rec = {"asin": i, "title": f"Title {i}", "brand": f"Brand{n % 2}",
                   "categories": [["Toys", f"Cat{n % 3}"], ["Toys", "Extra"]]}
            if with_urls:
                rec["imUrl"] = f"file://{image_dir}/{i}.png"
            fh.write(repr(rec) + "\n")
    if image_dir is not None:
        draw_images(image_dir, items[:-2])  # the second to last item gets no image file
        (image_dir / f"{items[0]}.png").write_bytes(b"not an image")  # one unreadable image


def draw_images(folder: Path, items: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(items):
        img = Image.new("RGB", (64, 48), (20 * n % 255, 90, 160))
        ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill=(255, 255 - 25 * n % 255, 0))
        img.save(folder / f"{i}.png")


def write_ml100k(root: Path, log) -> None:
    root.mkdir(parents=True, exist_ok=True)
    genres = ["unknown", "Action", "Comedy"]
    (root / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(genres)) + "\n")
    with open(root / "u.data", "w") as fh:
        for u, i, t in log:
            fh.write(f"{u[1:]}\t{i[1:]}\t4\t{t}\n")
    items = sorted({int(i[1:]) for _, i, _ in log})
    with open(root / "u.item", "w", encoding="latin-1") as fh:
        for i in items:
            flags = ["0", "1" if i % 2 else "0", "1" if i % 3 else "0"]
            fh.write(f"{i}|Café {i} (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n")


def write_ml1m(root: Path, log) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "ratings.dat", "w") as fh:
        for u, i, t in log:
            fh.write(f"{u[1:]}::{i[1:]}::4::{t}\n")
    items = sorted({int(i[1:]) for _, i, _ in log})
    with open(root / "movies.dat", "w", encoding="latin-1") as fh:
        for i in items:
            fh.write(f"{i}::Film {i} (1990)::Drama|{'Comedy' if i % 2 else 'War'}\n")


def write_sequences(root: Path, log, name: str = "Toy") -> None:
    """Sequence files: one line per user (first-seen order), items in the log's order."""
    root.mkdir(parents=True, exist_ok=True)
    per_user: dict[str, list] = {}
    for u, i, t in log:
        per_user.setdefault(u, []).append((i, t))
    with open(root / f"{name}_item.txt", "w") as fi, open(root / f"{name}_time.txt", "w") as ft:
        for u, rows in per_user.items():
            fi.write(u + " " + " ".join(i for i, _ in rows) + "\n")
            ft.write(u + " " + " ".join(str(t) for _, t in rows) + "\n")


def expected_sequences(log, k: int = 5) -> dict[str, list[tuple[str, int]]]:
    """Brute-force reference of the whole preprocessing: dedupe, k-core (users need max(k,3)),
    stable time sort. Plain Python, independent of the pipeline's code."""
    seen, rows = set(), []
    for r in log:
        if r not in seen:
            seen.add(r)
            rows.append(r)
    while True:
        uc, ic = {}, {}
        for u, i, _ in rows:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        kept = [r for r in rows if uc[r[0]] >= max(k, 3) and ic[r[1]] >= k]
        if len(kept) == len(rows):
            break
        rows = kept
    out: dict[str, list] = {}
    for u, i, t in rows:
        out.setdefault(u, []).append((i, t))
    return {u: sorted(v, key=lambda x: x[1]) for u, v in out.items()}  # sorted() is stable


def write_json_lines(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
