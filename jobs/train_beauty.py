"""Train HM4SR on Amazon 2014 Beauty.

    python jobs/train_beauty.py --raw-dir DIR [key.path=value ...]

DIR holds either the raw Amazon files (reviews_Beauty_5.json.gz + meta_Beauty.json.gz) or the
sequence-file copy (Beauty_item.txt + Beauty_time.txt, IDs and timestamps only) such as
../shared/data/amazon-beauty. See jobs/common.py for every flag.
"""

from pathlib import Path

from jobs.common import DatasetJob, main, parse_args

AMAZON = DatasetJob(name="beauty", source="amazon2014", prep={"category": "Beauty"},
                    description="Amazon 2014 Beauty")
SEQUENCES = DatasetJob(name="beauty", source="sequence", prep={}, description="Amazon 2014 Beauty (sequences)")


def pick(argv: list[str]) -> DatasetJob:
    raw = parse_args(AMAZON, argv).raw_dir
    return SEQUENCES if raw and (Path(raw) / "Beauty_item.txt").exists() else AMAZON


if __name__ == "__main__":
    main(pick)
