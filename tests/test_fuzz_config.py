"""Property-based tests (hypothesis): ``--set`` overrides and config files with hostile values.

Every outcome is a :class:`Config` that holds only what the code can use (finite floats, integers in
their bounds, a known metric) and survives dump/load in YAML and JSON, or a :class:`ConfigError`
whose message starts with the field (or the override, or the file) at fault; never another
exception. ``CLIPLUNG_FUZZ_EXAMPLES`` raises the example count (default: a fixed, fast set).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cliplung.config import Config, ConfigError, dump_config, load_config, preset

EXAMPLES = int(os.environ.get("CLIPLUNG_FUZZ_EXAMPLES", "0"))


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _leaves(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        out += _leaves(value, f"{path}.") if isinstance(value, dict) else [path]
    return out


FIELDS = _leaves(preset("debug").to_dict())
SECTIONS = ["prepare", "data", "model", "train", "train.augment", "tune", "tune.space", "metrics", "storage"]

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(-3, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            ".inf",
            "-.inf",
            ".nan",
            "1e400",
            "-1e400",
            "1e-2",
            "1E5",
            "0x10",
            "0o7",
            "1_000",
            "-0",
            "1.",
            ".5",
            "2**8",
        ]
    ),
)
scalars = st.one_of(
    numbers,
    st.sampled_from(["true", "false", "yes", "no", "on", "off", "null", "~", "", "''", '"1"']),
    st.sampled_from(
        ["val/macro_f1", "val/auc", "train/ic", "test/auc", "epoch", "cliplung", "ce", "lidc", "bf16"]
    ),
    st.text(max_size=12),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4).map(lambda items: "[" + ", ".join(i or "''" for i in items) + "]"),
    st.sampled_from(
        ["{a: 1}", "{}", "[1,", "{", "[[1, 2]]", "!!python/object:os.system ls", "&a [*a]", "- 1"]
    ),
)
keys = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from(SECTIONS),
    st.sampled_from(
        ["", ".", "model..n_ctx", "model.n_ctx.x", "nosuch.field", "train.augment.rotate", "preset"]
    ),
)


def _default(path: str):
    node = preset("debug").to_dict()
    for part in path.split("."):
        node = node[part]
    return node


def _near(default):
    """Values of the default's own type, around it: most of them valid, some just out of bounds."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(min(-2, default - 3), max(8, 2 * default + 3))
    if isinstance(default, float):
        return st.floats(-1.0, 2 * abs(default) + 1.0, allow_nan=False)
    return st.just(default)


@st.composite
def override(draw) -> str:
    key = draw(keys)
    if key in FIELDS and draw(st.booleans()):
        return f"{key}={json.dumps(draw(_near(_default(key))))}"
    return f"{key}={draw(values)}"


overrides = st.lists(st.one_of(override(), st.sampled_from(["model.n_ctx", "=1"])), min_size=1, max_size=4)


def _assert_usable(cfg: Config, tmp: Path) -> None:
    """Finite floats everywhere, and the config round-trips through YAML and JSON."""

    def walk(value, path):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
        elif isinstance(value, tuple):
            for v in value:
                walk(v, path)
        elif isinstance(value, float):
            assert math.isfinite(value), path
        elif isinstance(value, int) and not isinstance(value, bool):
            assert -(2**63) <= value < 2**63, path

    walk(cfg, "")
    for suffix in (".yaml", ".json"):
        path = tmp / f"c{suffix}"
        dump_config(cfg, path)
        assert load_config(path) == cfg, suffix


KNOWN_HEADS = {*FIELDS, *SECTIONS, "name", "preset", "config"}


def _prefixes(key: str) -> set[str]:
    parts = key.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


def _assert_names_a_field(message: str, keys: list[str]) -> None:
    """The message starts with a config field, the override or the file, or a name the user wrote."""
    event("refused")
    head = message.split(":", 1)[0]
    written = set().union(*(_prefixes(k) for k in keys)) if keys else set()
    assert (
        head in KNOWN_HEADS
        or any(head == k or head.startswith(f"{k}.") for k in written)
        or head.startswith("override ")
    ), message
    assert "Traceback" not in message and len(message) < 2000, message


@fuzz_settings(150)
@given(items=overrides)
def test_overrides_give_a_usable_config_or_an_error_naming_the_field(items) -> None:
    try:
        cfg = load_config("debug", items)
    except ConfigError as exc:
        _assert_names_a_field(str(exc), [item.split("=", 1)[0].strip() for item in items])
    else:
        event("accepted")
        with tempfile.TemporaryDirectory(prefix="cliplung-fuzz-") as tmp:
            _assert_usable(cfg, Path(tmp))


sections = st.dictionaries(st.sampled_from(FIELDS), values, max_size=3)


def _file_keys(text: str) -> list[str]:
    """The dotted keys a YAML text holds (what an error about it may start with)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return []

    def walk(node, prefix):
        if not isinstance(node, dict):
            return []
        out = []
        for key, value in node.items():
            out += [f"{prefix}{key}", *walk(value, f"{prefix}{key}.")]
        return out

    return walk(data, "")


@fuzz_settings(100)
@given(text=st.one_of(values, sections.map(lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))))
def test_config_files_give_a_usable_config_or_an_error_naming_the_file_or_field(text) -> None:
    with tempfile.TemporaryDirectory(prefix="cliplung-fuzz-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            _assert_names_a_field(str(exc), _file_keys(text))
        else:
            event("accepted")
            _assert_usable(cfg, path.parent)
