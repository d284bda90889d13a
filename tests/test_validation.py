"""Invalid input is refused with one-line ValueErrors: recipe field and step option types,
non-finite calibration data, non-finite or non-positive quantizer scales."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.calib.data import CalibrationData
from ptqkit.pipeline import Recipe, StepSpec

FAST = {"w_range": "minmax", "a_range": "minmax"}


def _one_line_error(call, *parts: str) -> str:
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


@pytest.mark.parametrize("key, value, expected", [
    ("w_symmetric", "no", "a bool"),
    ("a_symmetric", 1, "a bool"),
    ("first_last_8bit", "false", "a bool"),
    ("version", "1", "an int"),
    ("w_bits", True, "an int"),
    ("a_bits", 4.0, "an int"),
    ("seed", "0", "an int"),
    ("calib_size", [100], "an int or null"),
    ("percentile", "high", "a number"),
    ("percentile", False, "a number"),
    ("percentile", float("nan"), "numbers must be finite"),
    ("include", 5, "a string or a list of strings"),
    ("exclude", [1, 2], "a string or a list of strings"),
    ("overrides", ["conv1"], "a mapping"),
    ("overrides", {"conv1": 8}, "a mapping"),
    ("w_range", 3, "a string"),
    ("steps", "lapq", "a list"),
])
def test_recipe_field_of_wrong_type_is_named(key, value, expected) -> None:
    _one_line_error(lambda: Recipe.from_dict({key: value}), repr(key), expected, repr(value))


def test_version_of_wrong_type_is_not_reported_as_unsupported() -> None:
    msg = _one_line_error(lambda: Recipe.from_dict({"version": "1"}), "'version'")
    assert "not supported" not in msg


def test_yaml_no_and_false_strings_are_not_read_as_true(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text('w_symmetric: "no"\n')
    _one_line_error(lambda: Recipe.from_yaml(path), "'w_symmetric'", "'no'")
    path.write_text("first_last_8bit: false\nw_symmetric: true\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.first_last_8bit is False and recipe.w_symmetric is True


def test_valid_types_still_load() -> None:
    recipe = Recipe.from_dict({"percentile": 99, "include": "conv*", "calib_size": None,
                               "overrides": {"fc": [8, 8]},
                               "steps": ["bn_tuning", {"name": "lapq",
                                                       "options": {"p_grid": [2, 3, 4]}}]})
    assert recipe.include == ("conv*",) and recipe.overrides == {"fc": (8, 8)}
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("name, options, key, expected", [
    ("lapq", {"xtol": "high"}, "xtol", "a number"),
    ("lapq", {"p_grid": 3}, "p_grid", "a list of numbers"),
    ("lapq", {"bounds": [0.5]}, "bounds", "a list of 2 numbers"),
    ("lapq", {"powell_samples": "all"}, "powell_samples", "an int or null"),
    ("bias_correction", {"activations": "yes"}, "activations", "a bool"),
    ("bias_tuning", {"iters": 1.5}, "iters", "an int"),
    ("mixed_precision", {"compression": "0.1"}, "compression", "a number or null"),
    ("mixed_precision", {"compression": 0.1, "fixed": {"fc": "w8a8"}}, "fixed", "a mapping"),
    ("mixed_precision", {"compression": 0.1, "tuner_options": [1]}, "tuner_options", "a mapping"),
    ("adaquant", {"mode": 1}, "mode", "a string"),
])
def test_step_option_of_wrong_type_is_named(name, options, key, expected) -> None:
    _one_line_error(lambda: Recipe.from_dict({"steps": [{"name": name, "options": options}]}),
                    repr(name), repr(key), expected, repr(options[key]))
    _one_line_error(lambda: StepSpec(name, options), repr(key), expected)


def test_tuner_options_are_checked_as_adaquant_options() -> None:
    steps = [{"name": "mixed_precision", "options": {
        "compression": 0.1, "tuner": "adaquant", "tuner_options": {"iters": "many"}}}]
    _one_line_error(lambda: Recipe.from_dict({"steps": steps}), "'iters'", "an int", "'many'")
    steps[0]["options"]["tuner_options"] = {"itres": 5}
    _one_line_error(lambda: Recipe.from_dict({"steps": steps}), "itres")


@pytest.mark.parametrize("steps, part", [
    ([5], "5"),
    ([{"name": ["lapq"]}], "['lapq']"),
    ([{"options": {}}], "name"),
    ([{"name": "lapq", "options": "fast"}], "'fast'"),
    ([{"name": "lapq", "option": {}}], "'option'"),
    ([{"name": "lapq", "options": {1: 2, "a": 3}}], "lapq"),
])
def test_malformed_step_entry_is_a_one_line_error(steps, part) -> None:
    _one_line_error(lambda: Recipe.from_dict({"steps": steps}), part)


def test_non_string_recipe_keys_are_a_one_line_error() -> None:
    msg = _one_line_error(lambda: Recipe.from_dict({1: 2, "w_bits": 4, None: 1}), "recipe key")
    assert re.search(r"\b1\b", msg)


def test_invalid_yaml_is_a_one_line_error(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("w_bits: [4\na_bits: 8\n")
    _one_line_error(lambda: Recipe.from_yaml(path), str(path), "YAML")


# ----------------------------------------------------------------------------- calibration data
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_calibration_tensor_names_batch_and_sample(tiny_data, bad) -> None:
    data = tiny_data.clone()
    data[37, 0, 2, 3] = bad  # batch 2 (of 16), sample 5 in it
    batches = list(data.split(16))
    _one_line_error(lambda: CalibrationData(batches), "batch 2", "sample 5",
                    "NaN" if bad != bad else "Inf")
    _one_line_error(lambda: CalibrationData(data, batch_size=16), "batch 2", "sample 5")


def test_non_finite_input_of_tuple_and_mapping_batches_is_named(tiny_data) -> None:
    labels = torch.zeros(16, dtype=torch.long)
    x = tiny_data[:16].clone()
    x[9] = float("nan")
    _one_line_error(lambda: CalibrationData([(tiny_data[16:32], labels), (x, labels)]),
                    "batch 1", "sample 9", "element 0")
    _one_line_error(lambda: CalibrationData([{"pixel_values": x, "labels": labels}]),
                    "batch 0", "sample 9", "'pixel_values'")


def test_non_finite_data_past_the_limit_is_not_used(tiny_data) -> None:
    data = tiny_data.clone()
    data[40] = float("nan")
    assert CalibrationData(data, limit=40).num_samples == 40


def test_quantize_refuses_non_finite_calibration_data(tiny, tiny_data) -> None:
    data = tiny_data.clone()
    data[3, 0, 0, 0] = float("nan")
    _one_line_error(lambda: ptqkit.quantize(tiny, data, Recipe(**FAST)), "batch 0", "sample 3")


# ----------------------------------------------------------------------------- scales
class Overflow(nn.Module):
    """Finite weights whose products overflow float32: the second layer sees inf inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.big, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        with torch.no_grad():
            self.big.weight.fill_(3e38)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.big(x)))


def test_non_finite_activation_scale_is_refused_with_the_layer_named() -> None:
    x = torch.rand(32, 4) + 0.5
    _one_line_error(lambda: ptqkit.quantize(Overflow().eval(), x, Recipe(**FAST)),
                    "'head'", "a_quant", "inf")


def test_non_finite_weight_scale_is_refused_with_the_layer_named(tiny, tiny_data) -> None:
    with torch.no_grad():
        tiny.fc.weight[1, 2] = float("nan")
    _one_line_error(lambda: ptqkit.quantize(tiny, tiny_data, Recipe(**FAST)),
                    "'fc'", "w_quant", "nan")


def test_nested_options_are_checked_when_the_options_are_built() -> None:
    from ptqkit.algorithms.mixed_precision import MixedPrecisionOptions

    _one_line_error(lambda: MixedPrecisionOptions(compression=0.1, tuner="adaquant",
                                                  tuner_options={"iters": "many"}),
                    "tuner_options (adaquant) option 'iters'", "an int", "'many'")
    _one_line_error(lambda: MixedPrecisionOptions(compression=0.1, tuner_options={"itres": 5}),
                    "unknown option(s) ['itres']", "valid options", "'iters'")
    _one_line_error(lambda: MixedPrecisionOptions(compression=0.1, tuner_options=[1]),  # type: ignore[arg-type]
                    "tuner_options (adaquant) options", "a mapping")
    assert MixedPrecisionOptions(compression=0.1, tuner_options={"iters": 3}).tuner_options == {"iters": 3}
