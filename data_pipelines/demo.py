"""A small demo data set in the raw Amazon 2014 format, with real temporal structure.

    python -m data_pipelines.demo OUT_DIR [--users 300]

Writes `reviews_Demo_5.json.gz` and `meta_Demo.json.gz` (Python-literal lines, as the real dumps)
and an `images/` folder of drawn product pictures. Behind it is `hm4sr_dist.synthetic`'s log: the
next item follows the current one within its product line after a short gap, and jumps to the
next line after a long one, so IDs, titles, categories, images and time all carry signal; a
quarter of the next items (`NOISE`) are any item of the same line, so even a perfect model cannot
rank every target first (a demo whose answer is certain would show nothing). Used by
the quickstart and the job-submission test; it exercises every stage a real user's files go
through.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

from PIL import Image, ImageDraw

from hm4sr_dist.synthetic import SyntheticLog, generate_log

LINES = ["trail running shoe", "espresso machine", "wooden puzzle", "noise cancelling headphone",
         "yoga mat", "cast iron pan", "watercolor set", "mechanical keyboard", "camping lantern",
         "ceramic teapot", "kids scooter", "board game"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "grey", "pink",
           "brown", "teal"]
RGB = [(200, 40, 40), (40, 70, 200), (40, 160, 60), (20, 20, 20), (235, 235, 235), (230, 210, 40),
       (240, 140, 30), (130, 50, 170), (128, 128, 128), (240, 150, 190), (120, 80, 40), (30, 150, 150)]


NOISE = 0.25


def item_code(item: int) -> str:
    return f"B{item:08d}"                         # ASIN-like


def write_demo(out_dir: str | Path, log: SyntheticLog, items_per_line: int, category: str = "Demo") -> Path:
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / f"reviews_{category}_5.json.gz", "wt") as fh:
        for user, (items, times) in enumerate(zip(log.sequences, log.timestamps)):
            for item, t in zip(items.tolist(), times.tolist()):
                fh.write(repr({"reviewerID": f"A{user:06d}", "asin": item_code(item),
                               "unixReviewTime": int(t), "overall": 5.0}) + "\n")
    with gzip.open(out / f"meta_{category}.json.gz", "wt") as fh:
        for item in range(1, log.catalog.n_items + 1):
            line, slot = (item - 1) // items_per_line, (item - 1) % items_per_line
            colour = COLOURS[slot % len(COLOURS)]
            fh.write(repr({
                "asin": item_code(item), "title": f"{colour} {LINES[line % len(LINES)]} model {slot}",
                "brand": f"Brand {line}", "price": 10.0 + slot,
                "categories": [[category, LINES[line % len(LINES)].title()],
                               [category, "Even" if slot % 2 == 0 else "Odd"]],
                "imUrl": f"http://example.invalid/{item_code(item)}.jpg"}) + "\n")
            picture = Image.new("RGB", (96, 96), RGB[line % len(RGB)])
            draw = ImageDraw.Draw(picture)
            draw.rectangle((10 + 6 * slot % 40, 20, 50 + 6 * slot % 40, 70), fill=RGB[slot % len(RGB)])
            draw.ellipse((30, 30, 60 + slot, 60 + slot), outline=(255, 255, 255), width=3)
            picture.save(images / f"{item_code(item)}.jpg")
    return out


def generate_demo(out_dir: str | Path, n_users: int = 300, n_lines: int = 8, items_per_line: int = 12,
                  seed: int = 0, category: str = "Demo") -> Path:
    # a quarter of the next items are any item of the same product line: the rest follows from the
    # item, its content and the time gap, so a good model scores well but not perfectly
    log = generate_log(n_users=n_users, n_clusters=n_lines, items_per_cluster=items_per_line,
                       min_len=6, max_len=30, seed=seed, noise_prob=NOISE)
    return write_demo(out_dir, log, items_per_line, category)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--category", default="Demo", help="the <Cat> of reviews_<Cat>_5.json.gz")
    args = parser.parse_args(argv)
    print(f"wrote {generate_demo(args.out_dir, args.users, seed=args.seed, category=args.category)}")


if __name__ == "__main__":
    main()
