"""From a trained run to recommendations (docs/serving.md).

`export` turns a run folder into a self-contained, checksummed export (weights as safetensors, the
resolved config, the raw <-> dense item ID map, the frozen feature tables the model reads) and
loads it back as an eval-mode `HM4SR`, without Ray or DeepSpeed; `scorer` ranks the catalogue for
(raw item, unix time) histories exactly as the evaluator ranks it; `batch` runs the scorer over a
split or a histories file on a Ray Data actor pool (`hm4sr-recommend`); `online` serves it on Ray
Serve (`hm4sr-serve`). Import from the modules: `from hm4sr_dist.serving.scorer import Scorer`.
"""
