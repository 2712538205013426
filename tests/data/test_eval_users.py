"""Evaluation batches name their users, so per-user test ranks can be paired across runs."""

import torch

from hm4sr_dist.data import ShardReader, read_manifest


def test_every_user_appears_once_over_the_ranks_and_padding_is_minus_one(prepared_sequences):
    n_users = read_manifest(prepared_sequences)["counts"]["users"]
    seen = []
    for rank in range(3):
        for entry in ShardReader(prepared_sequences, "test", 7, rank=rank, world_size=3):
            assert entry.users.dtype == torch.int64
            assert bool((entry.users[~entry.mask] == -1).all()) and bool((entry.users[entry.mask] >= 0).all())
            seen += entry.users[entry.mask].tolist()
    assert sorted(seen) == list(range(n_users))
