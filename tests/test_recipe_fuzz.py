"""Seeded fuzzing of recipe YAML: any document of the valid keys with values of any type gives a
Recipe or a one-line ValueError, never another exception."""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import yaml

from ptqkit.algorithms import STEPS
from ptqkit.pipeline import Recipe

DOCUMENTS = 600
STRINGS = ["", "no", "yes", "false", "true", "1", "0.5", "high", "nan", "*", "conv*", "w8a8",
           "w4a4,w8a8", "minmax", "mse", "percentile", "auto", "best", "default", "relaxed",
           "adaquant", "ranges", "parallel", "a\nb", "None", "[1, 2]"]
INTS = [-(2**70), -1, 0, 1, 2, 3, 4, 8, 16, 100, 2**40]
FLOATS = [0.0, -0.0, 0.13, 0.5, -1.5, 2.5, 99.9, 1e300, float("nan"), float("inf"), -float("inf")]


def _defaults(cls: type) -> dict[str, Any]:
    """Field name -> its default, as YAML would hold it (tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return yaml.safe_load(yaml.safe_dump(_plain(out)))


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(["str", "int", "float", "bool", "null", "list", "dict"] if depth < 2
                      else ["str", "int", "float", "bool", "null"])
    if kind == "str":
        return rng.choice(STRINGS)
    if kind == "int":
        return rng.choice(INTS)
    if kind == "float":
        return rng.choice(FLOATS)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = STRINGS + INTS[:4] + [None, True]
    return {rng.choice(keys): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _fields(rng: random.Random, defaults: dict[str, Any]) -> dict[Any, Any]:
    """Some of the keys, each with its default (valid) or a random value of any type."""
    keys = rng.sample(sorted(defaults), rng.randint(0, min(4, len(defaults))))
    out: dict[Any, Any] = {k: defaults[k] if rng.random() < 0.4 else _value(rng) for k in keys}
    if rng.random() < 0.05:
        out[rng.choice(["bogus", 3, None])] = _value(rng)
    return out


def _step(rng: random.Random, step_defaults: dict[str, dict[str, Any]]) -> Any:
    if rng.random() < 0.1:
        return _value(rng)
    name = rng.choice(sorted(step_defaults))
    if rng.random() < 0.3:
        return name
    entry: dict[str, Any] = {"name": name if rng.random() < 0.9 else _value(rng)}
    if rng.random() < 0.9:
        entry["options"] = (_fields(rng, step_defaults[name]) if rng.random() < 0.9
                            else _value(rng))
    return entry


def _document(rng: random.Random, recipe_defaults: dict[str, Any],
              step_defaults: dict[str, dict[str, Any]]) -> Any:
    if rng.random() < 0.03:
        return _value(rng)
    doc = _fields(rng, recipe_defaults)
    if rng.random() < 0.6:
        doc["steps"] = ([_step(rng, step_defaults) for _ in range(rng.randint(1, 3))]
                        if rng.random() < 0.9 else _value(rng))
    return doc


def test_random_recipes_give_a_recipe_or_a_one_line_value_error(tmp_path) -> None:
    rng = random.Random(20240601)
    recipe_defaults = _defaults(Recipe)
    step_defaults = {name: _defaults(step.Options) for name, step in STEPS.items()}
    assert {"w_symmetric", "steps", "overrides"} <= set(recipe_defaults)
    path = tmp_path / "recipe.yaml"
    outcomes = {"recipe": 0, "error": 0}
    start = time.perf_counter()
    for i in range(DOCUMENTS):
        doc = _document(rng, recipe_defaults, step_defaults)
        path.write_text(yaml.safe_dump(doc))
        try:
            Recipe.from_yaml(path)
            outcomes["recipe"] += 1
        except ValueError as exc:
            assert "\n" not in str(exc), (i, doc, str(exc))
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001 - any other type is the failure under test
            raise AssertionError(f"document {i} {doc!r} raised {type(exc).__name__}: {exc}") from exc
    assert time.perf_counter() - start < 10
    assert outcomes["recipe"] >= 20 and outcomes["error"] >= 200, outcomes
