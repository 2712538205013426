"""Train HM4SR on Amazon 2014 Home and Kitchen (reviews_Home_and_Kitchen_5.json.gz + meta_Home_and_Kitchen.json.gz).

    python jobs/train_home.py --raw-dir DIR_WITH_THE_JSON_GZ_FILES [--variant sasrec] [key.path=value ...]
    ray job submit --working-dir . -- python jobs/train_home.py --raw-dir /shared/amazon

See jobs/common.py for every flag.
"""

from jobs.common import DatasetJob, main

JOB = DatasetJob(name="home", source="amazon2014", prep={"category": "Home_and_Kitchen"}, description="Amazon 2014 Home and Kitchen (reviews_Home_and_Kitchen_5.json.gz + meta_Home_and_Kitchen.json.gz)")

if __name__ == "__main__":
    main(JOB)
