"""Image features (paper eq. 3): a frozen timm model's [CLS] output per item image (default the
paper's ViT, vit_base_patch16_224), as Ray Data `map_batches` over an actor pool.

A missing or unreadable image gives a zero vector and `ok = False` (counted by the caller),
never a crash. With `pretrained=False` the model is randomly initialised: only for tests and
offline smoke runs, and said loudly in the log and the manifest.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def create_model(name: str, pretrained: bool, checkpoint: str = ""):
    import timm

    if not pretrained and not checkpoint:
        log.warning("=" * 78 + "\nimage model %r is RANDOMLY INITIALISED (pretrained=False, no "
                    "checkpoint):\nits features carry no visual meaning; use for tests only.\n"
                    + "=" * 78, name)
    # num_classes=0 drops the head: the output is the pooled token ([CLS] for ViT, global_pool="token")
    return timm.create_model(name, pretrained=pretrained and not checkpoint, num_classes=0,
                             checkpoint_path=checkpoint or "")


class ImageEncoder:
    """Ray Data actor: batch {'item_id', 'image'} -> {'item_id', 'feature', 'ok'}."""

    def __init__(self, model: str, pretrained: bool = True, checkpoint: str = ""):
        import timm.data
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = create_model(model, pretrained, checkpoint).to(self.device).eval()
        config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**config)
        self.input_size = config["input_size"]
        self.width = int(self.model.num_features)

    def _load(self, ref: object):
        from PIL import Image

        if not ref:
            return None
        try:
            with Image.open(str(ref)) as img:
                return self.transform(img.convert("RGB"))
        except Exception:  # noqa: BLE001 - any unreadable image becomes a counted zero vector
            return None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [self._load(ref) for ref in batch["image"]]
        ok = np.array([t is not None for t in tensors])
        out = np.zeros((len(tensors), self.width), dtype=np.float32)
        if ok.any():
            x = self.torch.stack([t for t in tensors if t is not None]).to(self.device)
            with self.torch.inference_mode():
                out[ok] = self.model(x).float().cpu().numpy()
        return {"item_id": np.asarray(batch["item_id"]), "feature": out, "ok": ok}
