"""Distributed plumbing kept apart from the model: the cross-worker batch exchange."""

from hm4sr_dist.parallel.exchange import DistributedExchange

__all__ = ["DistributedExchange"]
