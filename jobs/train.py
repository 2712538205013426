"""Train HM4SR (or SASRec, or an ablation) on one data set of the table below.

    python jobs/train.py --dataset beauty --raw-dir ../shared/data/amazon-beauty
    python jobs/train.py --dataset beauty --prepared-dir outputs/prepared/beauty --variant sasrec optim.epochs=50
    python jobs/train.py --dataset movielens --raw-dir ../shared/data/ml-100k --variant=-TMoE
    ray job submit --working-dir . -- python jobs/train.py --dataset toys --raw-dir /shared/amazon

Data sets (`--dataset`): beauty, toys, home, games (Amazon 2014: reviews_<Category>_5.json.gz +
meta_<Category>.json.gz in --raw-dir; beauty also reads the sequence-file copy, Beauty_item.txt +
Beauty_time.txt, IDs and timestamps only, such as ../shared/data/amazon-beauty) and movielens
(ml-100k or ml-1m: named after --raw-dir's folder). jobs/train_home.py is the same job for Home and
Kitchen, the documented `ray job submit` entry. Every other flag: jobs/common.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hm4sr_dist.config import ConfigError, closest
from jobs.common import DatasetJob, exit_on_user_error, parse_args, run_job


def _amazon(name: str, category: str, title: str) -> DatasetJob:
    return DatasetJob(name=name, source="amazon2014", prep={"category": category},
                      description=f"Amazon 2014 {title} (reviews_{category}_5.json.gz + meta_{category}.json.gz)")


DATASETS = {
    "beauty": _amazon("beauty", "Beauty", "Beauty"),
    "toys": _amazon("toys", "Toys_and_Games", "Toys and Games"),
    "home": _amazon("home", "Home_and_Kitchen", "Home and Kitchen"),
    "games": _amazon("games", "Video_Games", "Video Games"),
    "movielens": DatasetJob(name="movielens", source="movielens", description="MovieLens"),
}
BEAUTY_SEQUENCES = DatasetJob(name="beauty", source="sequence", description="Amazon 2014 Beauty (sequences)")


def pick(name: str, argv: list[str]) -> DatasetJob:
    """The table's job, fitted to --raw-dir where the raw folder decides (Beauty's sequence files,
    MovieLens's ml-100k / ml-1m)."""
    if name not in DATASETS:
        raise ConfigError(key="--dataset", expected=f"one of {sorted(DATASETS)}", got=name,
                          suggestion=closest(name, DATASETS))
    job = DATASETS[name]
    raw = parse_args(job, argv).raw_dir
    if name == "beauty" and raw and (Path(raw) / "Beauty_item.txt").exists():
        return BEAUTY_SEQUENCES
    if name == "movielens" and raw:
        return DatasetJob(name=Path(raw).name, source="movielens", description=f"MovieLens {Path(raw).name}")
    return job


def split_dataset(argv: list[str]) -> tuple[str, list[str]]:
    """`--dataset NAME` (or `--dataset=NAME`) out of the command line; the rest is the job's."""
    rest, name, it = [], "", iter(argv)
    for arg in it:
        if arg == "--dataset":
            name = next(it, "")
        elif arg.startswith("--dataset="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not name:
        raise ConfigError(key="--dataset", expected=f"one of {sorted(DATASETS)}", got="nothing")
    return name, rest


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv

    if not any(a == "--dataset" or a.startswith("--dataset=") for a in argv) and {"-h", "--help"} & set(argv):
        print(__doc__)
        return {}

    def run() -> dict:
        name, rest = split_dataset(argv)
        return run_job(pick(name, rest), rest)

    return exit_on_user_error(run)


if __name__ == "__main__":
    main()
