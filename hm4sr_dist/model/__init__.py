"""Plain-PyTorch HM4SR (no distributed code in here)."""

from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.model.hm4sr import HM4SR, HM4SROutput, placeholder_mask

__all__ = ["HM4SR", "HM4SROutput", "ItemCatalog", "placeholder_mask"]
