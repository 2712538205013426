"""Train HM4SR on Amazon 2014 Home and Kitchen: `jobs/train.py --dataset home`, kept as the
documented `ray job submit` entry.

    python jobs/train_home.py --raw-dir DIR_WITH_THE_JSON_GZ_FILES [--variant sasrec] [key.path=value ...]
    ray job submit --working-dir . -- python jobs/train_home.py --raw-dir /shared/amazon

DIR holds reviews_Home_and_Kitchen_5.json.gz + meta_Home_and_Kitchen.json.gz. Every flag:
jobs/common.py.
"""

import sys

from jobs.train import main

if __name__ == "__main__":
    main(["--dataset", "home", *sys.argv[1:]])
