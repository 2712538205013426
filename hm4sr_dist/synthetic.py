"""A small generated interaction log with a learnable, time-dependent next-item rule.

Used by unit tests and the quickstart; not a benchmark. Items fall into clusters (their
categories); text and image features are noisy copies of a cluster centroid. Each user walks the
catalogue: after a SHORT gap (minutes to hours) the next item is the successor within the same
cluster, after a LONG gap (weeks) it is the same slot in the next cluster. The rule reads the gap
before the current item, which the model sees, so ID, content and time all carry signal. With
`noise_prob` > 0 that share of the next items is instead any item of the current item's cluster
(the demo data set uses 0.25): the rule then no longer decides every target.

Samples and batches go through the training path: `records.user_samples` (the leave-one-out
split, spec §1) and the reader's `collate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.data.reader import collate
from hm4sr_dist.data.records import Sample, user_samples
from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.model.time import interval_buckets, max_bucket_for

START_TIME = 1_700_000_000


@dataclass
class SyntheticLog:
    sequences: list[np.ndarray]   # per user, item IDs (1-based), chronological
    timestamps: list[np.ndarray]  # per user, int64 unix seconds
    catalog: ItemCatalog


def generate_log(n_users: int = 300, n_clusters: int = 8, items_per_cluster: int = 12,
                 min_len: int = 6, max_len: int = 30, text_width: int = 32, image_width: int = 24,
                 long_gap_prob: float = 0.3, seed: int = 0, noise_prob: float = 0.0) -> SyntheticLog:
    rng = np.random.default_rng(seed)
    n_items = n_clusters * items_per_cluster
    cluster = lambda item: (item - 1) // items_per_cluster          # noqa: E731
    slot = lambda item: (item - 1) % items_per_cluster              # noqa: E731
    sequences, timestamps = [], []
    for _ in range(n_users):
        length = int(rng.integers(min_len, max_len + 1))
        item = int(rng.integers(1, n_items + 1))
        t = START_TIME + int(rng.integers(0, 86400 * 30))
        items, times, long_gap = [item], [t], False
        for _ in range(length - 1):
            if long_gap:
                item = ((cluster(item) + 1) % n_clusters) * items_per_cluster + slot(item) + 1
            else:
                item = cluster(item) * items_per_cluster + (slot(item) + 1) % items_per_cluster + 1
            if noise_prob and rng.random() < noise_prob:    # any item of the line: only content helps
                item = cluster(item) * items_per_cluster + int(rng.integers(0, items_per_cluster)) + 1
            # This gap leads INTO the new item, so it is visible and decides the item after it.
            long_gap = bool(rng.random() < long_gap_prob)
            t += int(rng.integers(86400 * 14, 86400 * 28)) if long_gap else int(rng.integers(60, 6 * 3600))
            items.append(item)
            times.append(t)
        sequences.append(np.asarray(items, dtype=np.int64))
        timestamps.append(np.asarray(times, dtype=np.int64))
    centroids_txt = rng.normal(size=(n_clusters, text_width))
    centroids_img = rng.normal(size=(n_clusters, image_width))
    ids = np.arange(1, n_items + 1)
    text = np.zeros((n_items + 1, text_width), dtype=np.float32)
    image = np.zeros((n_items + 1, image_width), dtype=np.float32)
    text[1:] = centroids_txt[cluster(ids)] + 0.3 * rng.normal(size=(n_items, text_width))
    image[1:] = centroids_img[cluster(ids)] + 0.3 * rng.normal(size=(n_items, image_width))
    categories = np.zeros((n_items + 1, n_clusters + 1), dtype=bool)
    categories[ids, cluster(ids)] = True
    categories[ids, n_clusters] = slot(ids) % 2 == 0                 # a second, cross-cutting label
    all_times = np.concatenate(timestamps)
    max_gap = max(int(np.diff(t).max(initial=0)) for t in timestamps)
    catalog = ItemCatalog(
        n_items=n_items, text_features=torch.from_numpy(text), image_features=torch.from_numpy(image),
        categories=torch.from_numpy(categories), max_interval_bucket=max_bucket_for(max_gap, 100.0),
        time_origin=int(all_times.min()), n_days=int((all_times.max() - all_times.min()) // 86400) + 1)
    return SyntheticLog(sequences, timestamps, catalog)


def log_samples(log: SyntheticLog, split: str) -> list[Sample]:
    """Every (items, times, end) sample of `split`, user by user, exactly as the shard reader
    expands a user (train: every prefix; valid and test: one per user)."""
    return [sample for items, times in zip(log.sequences, log.timestamps)
            for sample in user_samples(items, times, split)]


def batches(samples: list[Sample], batch_size: int, max_len: int, shuffle: bool = False,
            seed: int = 0, drop_last: bool = False) -> list[Batch]:
    """Batches of `samples` through the reader's `collate` (the last `max_len` inputs kept)."""
    order = np.random.default_rng(seed).permutation(len(samples)) if shuffle else np.arange(len(samples))
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    return [collate([samples[i] for i in order[s:s + batch_size]], max_len)
            for s in range(0, stop, batch_size)]


def bucket_histogram(log: SyntheticLog, mu: float = 100.0) -> np.ndarray:
    """Counts per interval bucket (eq. 12), for inspection."""
    counts = np.zeros(log.catalog.max_interval_bucket + 1, dtype=np.int64)
    for times in log.timestamps:
        t = torch.from_numpy(times).unsqueeze(0)
        b = interval_buckets(t, torch.ones_like(t), mu, log.catalog.max_interval_bucket)
        counts += np.bincount(b.flatten().numpy(), minlength=len(counts))
    return counts
