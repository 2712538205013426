"""Train HM4SR on Amazon 2014 Video Games.

    python jobs/train_games.py --raw-dir DIR_WITH_THE_JSON_GZ_FILES [--variant sasrec] [key.path=value ...]
    ray job submit --working-dir . -- python jobs/train_games.py --raw-dir /shared/amazon

See jobs/common.py for every flag.
"""

from jobs.common import DatasetJob, main

JOB = DatasetJob(name="games", source="amazon2014", prep={"category": "Video_Games"}, description="Amazon 2014 Video Games")

if __name__ == "__main__":
    main(JOB)
