"""Train HM4SR on Amazon 2014 Toys and Games.

    python jobs/train_toys.py --raw-dir DIR_WITH_THE_JSON_GZ_FILES [--variant sasrec] [key.path=value ...]
    ray job submit --working-dir . -- python jobs/train_toys.py --raw-dir /shared/amazon

See jobs/common.py for every flag.
"""

from jobs.common import DatasetJob, main

JOB = DatasetJob(name="toys", source="amazon2014", prep={"category": "Toys_and_Games"}, description="Amazon 2014 Toys and Games")

if __name__ == "__main__":
    main(JOB)
