"""Train HM4SR on MovieLens (ml-100k or ml-1m): ID + title text + genres as categories + time.

    python jobs/train_movielens.py --raw-dir ../shared/data/ml-100k [key.path=value ...]

See jobs/common.py for every flag.
"""

from pathlib import Path

from jobs.common import DatasetJob, main, parse_args


def pick(argv: list[str]) -> DatasetJob:
    raw = parse_args(DatasetJob("movielens", "movielens"), argv).raw_dir
    name = Path(raw).name if raw else "movielens"
    return DatasetJob(name=name, source="movielens", description=f"MovieLens {name}")


if __name__ == "__main__":
    main(pick)
