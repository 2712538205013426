"""What a configuration can train on a data set: HM4SR's prerequisites, resolved in one place.

The rules (paper §4):

- a modality needs its item features (``id`` always has them);
- CP, ``loss.cp_weight > 0`` (eq. 21), needs item categories;
- IDCL, ``loss.idcl_weight > 0`` (eq. 23), needs the ``id`` modality (it contrasts H^id);
- PCL, ``loss.pcl_weight > 0`` (eq. 24-26), needs the Temporal MoE (the time placeholder is built
  from its time embedding) and a ``text`` or ``image`` modality (the positions it replaces).

``resolve(cfg, offer, explicit)`` returns the config with what a rule forbids switched off, plus one
note per change. Which requests are switched off and which stop the run:

- a value from the YAML file or a default is a *wish*: the paper's config turns everything on, and
  a data set without images or categories should still train, so it is switched off with a note;
- a value set on the command line, or swept by Tune (the keys in ``explicit``), is a *request*:
  switching it off would silently run something else than asked (``loss.cp_weight=0.5`` on data
  without categories trains no CP; a sweep of l3 on a model without PCL trains the same model six
  times), so ``check`` raises ``ConfigError`` naming the key, before any work starts;
- a model left without any modality is always an error.

``offer`` says what the data has (``DataOffer.from_manifest``); ``None`` means "not known yet", so
only the rules inside the config apply. The jobs call ``check`` before Ray starts and ``resolve``
once the data is prepared; ``with_variant`` applies a variant and resolves (``-TMoE`` thereby
drops PCL); study trials resolve each trial. The model and the objective only assert the result.

    cfg, notes = resolve(cfg, DataOffer.from_manifest(manifest), explicit={"loss.cp_weight": "command line"})

``loss.main_loss=vocab_parallel`` has rules of its own that need no data and are always errors
(``config.check_vocab_parallel``, called by ``ExperimentConfig.validate``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple

from hm4sr_dist.config import (MODALITIES, ConfigError, ExperimentConfig, LossConfig, ModelConfig,
                               apply_variant, from_dict, get_key, set_key, to_dict)

CONTENT_MODALITIES = ("text", "image")     # the modalities PCL runs on (eq. 26)


@dataclass(frozen=True)
class DataOffer:
    """What a data set can feed: the modalities with item features (always ``id``) and whether items
    have categories."""

    modalities: frozenset = frozenset(MODALITIES)
    categories: bool = True

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> "DataOffer":
        """From a prepared data set's manifest.json (``features`` and ``n_categories``)."""
        return cls(frozenset({"id"} | set(manifest.get("features") or {})),
                   bool(manifest.get("n_categories")))


class Problem(NamedTuple):
    """One broken rule: the key to change, the value that satisfies the rule (None: none does)."""

    key: str
    fix: Any
    expected: str       # "0 when the data set has no item categories": for the error
    why: str            # the reason behind the rule, for the error
    note: str           # "set to 0 (...)": for the note when it is switched off


class Resolution(NamedTuple):
    config: ExperimentConfig
    notes: list[str]


def problems(model: ModelConfig, loss: LossConfig, offer: DataOffer | None = None) -> list[Problem]:
    """Every rule `model` + `loss` break on data offering `offer`, in the order they are fixed."""
    offer = offer or DataOffer()
    found = []
    kept = [m for m in model.modalities if m in offer.modalities]
    missing = [m for m in model.modalities if m not in offer.modalities]
    has = sorted(offer.modalities, key=MODALITIES.index)
    if missing:
        found.append(Problem("model.modalities", kept or None,
                             f"{'' if kept else 'at least one of the '}modalities the data set has "
                             f"features for ({has})", "",
                             f"{missing} dropped (the data set has no such features)"))
    if loss.cp_weight > 0 and not offer.categories:
        found.append(Problem("loss.cp_weight", 0.0, "0 when the data set has no item categories",
                             "CP predicts them, eq. 21", "set to 0 (the data set has no item categories)"))
    if loss.idcl_weight > 0 and "id" not in kept:
        found.append(Problem("loss.idcl_weight", 0.0,
                             f"0 when model.modalities ({model.modalities}) has no id",
                             "IDCL contrasts the id sequence, eq. 23",
                             "set to 0 (IDCL needs the id modality)"))
    if loss.pcl_weight > 0:
        if not model.use_temporal_moe:
            why = "model.use_temporal_moe is false"
        elif set(CONTENT_MODALITIES) & set(kept):
            why = ""
        elif set(CONTENT_MODALITIES) & set(model.modalities):
            why = "the data set has no text or image features"
        else:
            why = f"model.modalities ({model.modalities}) has no text or image"
        if why:
            found.append(Problem("loss.pcl_weight", 0.0, f"0 when {why}",
                                 "PCL's placeholder is built from the Temporal MoE's time embedding and "
                                 "replaces text or image positions, eq. 24",
                                 "set to 0 (PCL needs the Temporal MoE and a text or image modality; "
                                 f"{why})"))
    return found


def _sources(explicit: Mapping[str, str] | Iterable[str] | None) -> dict[str, str] | None:
    if explicit is None or isinstance(explicit, Mapping):
        return None if explicit is None else dict(explicit)
    return {key: "" for key in explicit}


def check(cfg: ExperimentConfig, offer: DataOffer | None = None,
          explicit: Mapping[str, str] | Iterable[str] | None = None) -> None:
    """Raise ConfigError for a rule `cfg` breaks on a key that must not be switched off silently.

    `explicit` maps the keys the user asked for (command line, sweep) to their source; only those
    (and a model left without modalities) are errors. `explicit=None` makes every broken rule an
    error: what a config that is about to be built must satisfy, i.e. one already resolved.
    """
    sources = _sources(explicit)
    for p in problems(cfg.model, cfg.loss, offer):
        if p.fix is None or sources is None or p.key in sources:
            raise ConfigError(key=p.key, source=(sources or {}).get(p.key, ""), expected=p.expected,
                              got=get_key(cfg, p.key), why=p.why)


def resolve(cfg: ExperimentConfig, offer: DataOffer | None = None,
            explicit: Mapping[str, str] | Iterable[str] = ()) -> Resolution:
    """A copy of `cfg` with what `offer` and the config's own switches cannot support turned off,
    and one note per change (``loss.cp_weight: set to 0 (the data set has no item categories)``).
    Raises ConfigError instead when the key was asked for explicitly (see `check`)."""
    check(cfg, offer, explicit)
    out = from_dict(type(cfg), to_dict(cfg))
    notes = []
    for p in problems(cfg.model, cfg.loss, offer):
        set_key(out, p.key, p.fix)
        notes.append(f"{p.key}: {p.note}")
    return Resolution(out.validate(), notes)


# Keys that do nothing unless a switch is on: sweeping one of them while its switch is off trains the
# same model once per value.
_NEEDS = (
    (("loss.pcl_ratio", "loss.pcl_temperature"), "loss.pcl_weight", "PCL is off"),
    (("loss.idcl_temperature",), "loss.idcl_weight", "IDCL is off"),
    (("model.n_interactive_experts", "model.alpha_init_id", "model.alpha_init_content"),
     "model.use_interactive_moe", "the Interactive MoE is off"),
    (("model.n_temporal_experts", "model.temporal_expert_init_std", "model.time_embedding",
      "model.interval_scale", "model.time_freq", "model.time_unit_seconds"),
     "model.use_temporal_moe", "the Temporal MoE is off"),
)


def inert_keys(cfg: ExperimentConfig) -> dict[str, str]:
    """Keys without effect in `cfg` (best checked on a resolved config) -> why."""
    out = {}
    for keys, switch, why in _NEEDS:
        if not get_key(cfg, switch):
            out.update({key: f"{why} ({switch} = {json.dumps(get_key(cfg, switch))})" for key in keys})
    return out


# Keys of main_loss=sampled: they configure nothing else, so set with vocab_parallel they are a mistake.
def unresolved(key: str, what: str) -> ConfigError:
    """The error of a model or objective handed a config that `resolve` did not fit to its data:
    ``raise unresolved("loss.cp_weight", "but the data set has no item categories")``."""
    return ConfigError(f"{key} > 0 {what}; fit the config to the data with "
                       f"hm4sr_dist.feasibility.resolve, which sets {key}=0 (or set it yourself)")


def with_variant(cfg: ExperimentConfig, variant: str, offer: DataOffer | None = None,
                 explicit: Mapping[str, str] | None = None) -> ExperimentConfig:
    """`cfg` with a variant of spec §4 applied (`config.apply_variant`) and what it makes
    infeasible switched off (-TMoE thereby drops PCL); a key in `explicit` that the variant changes,
    or that it makes infeasible, is a ConfigError."""
    return resolve(apply_variant(cfg, variant, explicit=explicit), offer, explicit or {}).config
