"""What the model needs to know about the item catalogue and the data's time axis."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ItemCatalog:
    """Frozen, item-sized tables. Row 0 of every table is the padding item (all zeros).

    The feature tables may be float16 or float32 and may be memory-mapped files
    (`hm4sr_dist.data.load_catalog` maps them read-only): the model never copies them whole, it
    upcasts them block by block (`hm4sr_dist.model.items`), so every worker of a node shares one
    page-cache copy. `feature_files` names the file behind a mapped table (modality -> path).
    """

    n_items: int                          # real items have IDs 1..n_items
    text_features: Tensor | None = None   # (n_items + 1, w_txt) float16/32, f_txt of eq. 2
    image_features: Tensor | None = None  # (n_items + 1, w_img) float16/32, f_img of eq. 3
    categories: Tensor | None = None      # (n_items + 1, C) multi-hot (bool or 0/1)
    max_interval_bucket: int = 0          # largest floor(mu*log2(a+1)) in the training data
    time_origin: int = 0                  # unix seconds; the data's first timestamp
    n_days: int = 1                       # days spanned by the data (for the "day" embedding)
    feature_files: dict[str, str] = field(default_factory=dict)   # modality -> mapped .npy file

    @property
    def n_categories(self) -> int:
        return 0 if self.categories is None else int(self.categories.shape[1])

    def feature_table(self, modality: str) -> Tensor | None:
        return {"text": self.text_features, "image": self.image_features}.get(modality)

    def validate(self) -> "ItemCatalog":
        for name in ("text_features", "image_features", "categories"):
            table = getattr(self, name)
            if table is None:
                continue
            if table.dim() != 2 or table.shape[0] != self.n_items + 1:
                raise ValueError(f"ItemCatalog.{name}: expected {self.n_items + 1} rows "
                                 f"(n_items + padding) and 2 dimensions, got shape {tuple(table.shape)}")
            if name != "categories" and not torch.is_floating_point(table):
                raise ValueError(f"ItemCatalog.{name}: expected a float table, got {table.dtype}")
            if bool(table[0].any()):      # reads one row: cheap on a mapped table
                raise ValueError(f"ItemCatalog.{name}: row 0 is the padding item and must be zeros")
        return self
