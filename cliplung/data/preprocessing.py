"""The rule that data fits a model: same patch size, spacing and HU window as the ``prepare`` section.

A model sees patches cut with ``prepare.patch_size``, ``prepare.spacing_mm`` and
``prepare.hu_window`` (:func:`cliplung.data.dicom.extract_patch`); a store records the values it was
built with in its attributes, and ``cliplung predict`` records those it cut a DICOM patch with.
:func:`check_preprocessing` compares such a record with a config's ``prepare`` section and is the
only place that does:

* **training** (``checkpoint=None``, :func:`cliplung.data.ingest.open_training_store`): the config
  can still change, so the error is a :class:`~cliplung.config.ConfigError` naming the field and the
  ``--set`` that matches the store;
* **evaluate / predict** (``checkpoint`` given): the checkpoint's config is fixed, so the error is a
  :class:`~cliplung.data.store.StoreError` naming the checkpoint and the ``cliplung prepare`` flag
  that rebuilds the data to fit it.

Values a record lacks are not compared (hand-written stores may omit them), except a store's patch
size, which its patch array always shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cliplung.config import ConfigError, PrepareConfig
from cliplung.data.store import NoduleStore, StoreError

__all__ = ["PREPARE_FLAGS", "check_preprocessing", "preprocessing_of", "store_preprocessing"]

PREPARE_FLAGS = {"patch_size": "--patch-size", "spacing_mm": "--spacing", "hu_window": "--hu-window"}
"""Each preprocessing value and the ``cliplung prepare`` flag that sets it."""


def preprocessing_of(prepare: PrepareConfig) -> dict[str, Any]:
    """The preprocessing values of a ``prepare`` section, as a store records them."""
    return {
        "patch_size": int(prepare.patch_size),
        "spacing_mm": float(prepare.spacing_mm),
        "hu_window": [float(prepare.hu_window[0]), float(prepare.hu_window[1])],
    }


def store_preprocessing(store: NoduleStore) -> dict[str, Any]:
    """What ``store`` records of its preprocessing; the patch size from the patch array when absent."""
    attrs = store.attrs
    out = {key: attrs[key] for key in PREPARE_FLAGS if attrs.get(key) is not None}
    if "patch_size" not in out and "patches" in store.fields:
        out["patch_size"] = int(store.array("patches").shape[1])
    return out


def _normal(value: Any) -> Any:
    """A recorded value in comparable form (floats, a list for the window); None if malformed."""
    try:
        if isinstance(value, list | tuple):
            return [float(v) for v in value]
        return float(value)
    except (TypeError, ValueError):
        return None


def _shown(key: str, value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(f"{float(v):g}" if isinstance(v, int | float) else str(v) for v in value)
    if key == "patch_size" and isinstance(value, int | float) and float(value).is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_preprocessing(
    recorded: Mapping[str, Any], prepare: PrepareConfig, *, source: str, checkpoint: str | None = None
) -> None:
    """Raise unless ``recorded`` (a store's attributes, or the record of a DICOM cut) matches ``prepare``.

    ``source`` names the data in the message (``store runs/x``); ``checkpoint`` the model it is
    compared with (None while training: see the module docstring for the error each case raises).
    """
    expected = preprocessing_of(prepare)
    for key, want in expected.items():
        if recorded.get(key) is None:
            continue
        have = _normal(recorded[key])
        if have is not None and not isinstance(have, list) and not math.isfinite(have):
            have = None
        if have == _normal(want):
            continue
        have_text, want_text = _shown(key, recorded[key]), _shown(key, want)
        if checkpoint is None:
            value = f"[{have_text}]" if key == "hu_window" else have_text
            raise ConfigError(
                f"prepare.{key}: {source} was prepared with {key}={have_text} but the config says "
                f"{want_text} (pass --set prepare.{key}={value} or rebuild the store)"
            )
        if key == "patch_size":
            raise StoreError(
                f"{source} holds {have_text}^3 patches but checkpoint {checkpoint} was trained on "
                f"{want_text}^3 patches (prepare.patch_size); use data prepared with "
                f"cliplung prepare {PREPARE_FLAGS[key]} {want_text}"
            )
        raise StoreError(
            f"{source} was prepared with {key}={have_text} but checkpoint {checkpoint} was trained on "
            f"{key}={want_text} (prepare.{key}); use data prepared with cliplung prepare "
            f"{PREPARE_FLAGS[key]} {want_text}, or a checkpoint trained on {key}={have_text}"
        )
