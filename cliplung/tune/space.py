"""What a search varies: Optuna distributions over config fields, and their checks.

``model.n_ctx`` comes from ``tune.space.n_ctx``, ``model.lambda_{ic,ca,ia}`` are uniform,
``train.lr`` and ``train.weight_decay`` log-uniform, each keyed by its dotted config field. A
range of one value fixes that field. The checks run before anything starts: every ``n_ctx`` must
divide ``model.feature_channels``, something must vary, and ``model.method=ce`` (no prompts, no
contrastive losses) cannot search prompt length or loss weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from cliplung.config import Config, ConfigError, config_from_dict

__all__ = ["SearchPlan", "apply_params", "search_space", "trial_config"]


@dataclass(frozen=True)
class SearchPlan:
    """What a search varies (Optuna distributions) and what it holds fixed, by config field."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any]


def search_space(config: Config) -> SearchPlan:
    """The search space of ``config.tune.space``; raises :class:`ConfigError` when it is empty or
    contradicts the rest of the config."""
    space, model = config.tune.space, config.model
    bad = [n for n in space.n_ctx if model.feature_channels % n]
    if bad:
        divisors = [d for d in range(1, model.feature_channels + 1) if model.feature_channels % d == 0]
        raise ConfigError(
            f"tune.space.n_ctx: {bad} do not divide model.feature_channels={model.feature_channels} "
            f"(one channel group per context token); choose from {divisors}"
        )
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    choices = tuple(dict.fromkeys(space.n_ctx))
    if len(choices) > 1:
        distributions["model.n_ctx"] = CategoricalDistribution(choices)
    else:
        fixed["model.n_ctx"] = choices[0]
    for key, (low, high), log in (
        ("model.lambda_ic", space.lambda_ic, False),
        ("model.lambda_ca", space.lambda_ca, False),
        ("model.lambda_ia", space.lambda_ia, False),
        ("train.lr", space.lr, True),
        ("train.weight_decay", space.weight_decay, True),
    ):
        if low == high:
            fixed[key] = low
        else:
            distributions[key] = FloatDistribution(low, high, log=log)
    if not distributions:
        raise ConfigError(
            "tune.space: the search space is empty: every parameter has a single value "
            f"({', '.join(f'{k}={v}' for k, v in fixed.items())}); widen a range or list several n_ctx"
        )
    if model.method == "ce":
        unused = [k for k in distributions if k.startswith(("model.n_ctx", "model.lambda_"))]
        if unused:
            raise ConfigError(
                f"tune.space: model.method='ce' has no prompts and no contrastive losses, so searching "
                f"{unused} changes nothing; give them a single value or use method cliplung/coop/cocoop"
            )
    return SearchPlan(distributions, fixed)


def apply_params(config: Config, params: dict[str, Any]) -> Config:
    """``config`` with ``{"section.field": value}`` applied (validated like any config)."""
    data = config.to_dict()
    for key, value in params.items():
        section, _, name = key.partition(".")
        if section not in data or not isinstance(data[section], dict) or name not in data[section]:
            raise ConfigError(f"{key}: no such config field")
        data[section][name] = value.item() if hasattr(value, "item") else value
    return config_from_dict(data)


def trial_config(base: Config, params: dict[str, Any], trial_id: str, runs_root: str) -> Config:
    """The training config of one trial: the searched values applied, its own run under
    ``runs_root`` named after the trial."""
    config = apply_params(base, params)
    return config.replace(name=trial_id, storage=dataclasses.replace(config.storage, path=runs_root))
