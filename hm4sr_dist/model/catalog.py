"""What the model needs to know about the item catalogue and the data's time axis."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ItemCatalog:
    """Frozen, item-sized tables. Row 0 of every table is the padding item (all zeros).

    Every worker holds these whole: they grow with the catalogue, not with the log.
    """

    n_items: int                          # real items have IDs 1..n_items
    text_features: Tensor | None = None   # (n_items + 1, w_txt) float, f_txt of eq. 2
    image_features: Tensor | None = None  # (n_items + 1, w_img) float, f_img of eq. 3
    categories: Tensor | None = None      # (n_items + 1, C) multi-hot (bool or 0/1)
    max_interval_bucket: int = 0          # largest floor(mu*log2(a+1)) in the training data
    time_origin: int = 0                  # unix seconds; the data's first timestamp
    n_days: int = 1                       # days spanned by the data (for the "day" embedding)

    @property
    def n_categories(self) -> int:
        return 0 if self.categories is None else int(self.categories.shape[1])

    def feature_table(self, modality: str) -> Tensor | None:
        return {"text": self.text_features, "image": self.image_features}.get(modality)

    def validate(self) -> "ItemCatalog":
        for name in ("text_features", "image_features", "categories"):
            table = getattr(self, name)
            if table is not None and table.shape[0] != self.n_items + 1:
                raise ValueError(f"ItemCatalog.{name}: expected {self.n_items + 1} rows "
                                 f"(n_items + padding), got {table.shape[0]}")
            if table is not None and bool(table[0].any()):
                raise ValueError(f"ItemCatalog.{name}: row 0 is the padding item and must be zeros")
        return self
