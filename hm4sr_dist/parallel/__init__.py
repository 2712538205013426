"""Distributed plumbing kept apart from the model: the cross-worker batch exchange, the
vocabulary-parallel (sharded item table) main loss."""

from hm4sr_dist.parallel.exchange import DistributedExchange
from hm4sr_dist.parallel.vocab import VocabParallelCrossEntropy

__all__ = ["DistributedExchange", "VocabParallelCrossEntropy"]
