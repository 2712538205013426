"""From a trained run to recommendations, without Ray or DeepSpeed.

`export` turns a run folder into a self-contained, checksummed export (weights as safetensors, the
resolved config, the raw <-> dense item ID map, the frozen feature tables the model reads) and
loads it back as an eval-mode `HM4SR`; `scorer` ranks the catalogue for (raw item, unix time)
histories exactly as the evaluator ranks it. Names resolve lazily, as in `hm4sr_dist.data`, so
importing one module does not import the other.
"""

from importlib import import_module

_WHERE = {
    "ExportError": "export", "ItemIdMap": "export", "LoadedExport": "export", "export_run": "export",
    "load_export": "export", "Scorer": "scorer", "ScoringError": "scorer", "chunked_topk": "scorer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
