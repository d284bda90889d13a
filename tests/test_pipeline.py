from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.calib.data import CalibrationData
from ptqkit.nn.modules import quant_layers
from ptqkit.pipeline import Recipe


def test_quantize_w8a8_close_to_float(tiny: nn.Module, tiny_data) -> None:
    q = ptqkit.quantize(tiny, tiny_data, Recipe())
    with torch.no_grad():
        ref, out = tiny(tiny_data), q(tiny_data)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.9
    rep = q.report
    assert set(rep.layers) == {"conv1", "dw", "fc"}
    assert all(info["sqnr_db"] > 25 for info in rep.layers.values())
    assert "conv1" in str(rep) and rep.steps[0]["step"] == "ranges"


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_range_methods_set_every_quantizer(tiny: nn.Module, tiny_data, method: str) -> None:
    q = ptqkit.quantize(tiny, tiny_data, Recipe(w_bits=4, a_bits=4, w_range=method,
                                                a_range=method))
    for layer in quant_layers(q).values():
        assert layer.w_quant.active and layer.a_quant.active


def test_mse_beats_minmax_at_low_bits(tiny: nn.Module, tiny_data) -> None:
    errs = {}
    for method in ("minmax", "mse"):
        q = ptqkit.quantize(tiny, tiny_data, Recipe(w_bits=3, a_bits=3, first_last_8bit=False,
                                                    w_range=method, a_range=method))
        with torch.no_grad():
            errs[method] = float((q(tiny_data) - tiny(tiny_data)).pow(2).mean())
    assert errs["mse"] < errs["minmax"]


def test_recipe_validation_and_roundtrip(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown recipe key"):
        Recipe.from_dict({"wbits": 4})
    with pytest.raises(ValueError, match="unknown range method"):
        Recipe(w_range="nope")
    with pytest.raises(ValueError, match="bits"):
        Recipe(w_bits=1)
    with pytest.raises(ValueError, match="unknown step"):
        Recipe.from_dict({"steps": ["nope"]})
    r = Recipe(w_bits=4, a_bits=4, exclude=("fc",), overrides={"conv1": (8, 8)})
    assert Recipe.from_dict(r.to_dict()) == r
    path = tmp_path / "r.yaml"
    path.write_text("w_bits: 4\na_bits: 8\nexclude: fc\n")
    assert Recipe.from_yaml(path) == Recipe(w_bits=4, a_bits=8, exclude=("fc",))


def test_calibration_data_formats(tiny: nn.Module, tiny_data) -> None:
    labels = torch.zeros(64, dtype=torch.long)
    loader = [(tiny_data[i:i + 16], labels[i:i + 16]) for i in range(0, 64, 16)]
    data = CalibrationData(loader, limit=40)
    assert data.num_samples == 40 and len(data) == 3 and data.has_labels
    assert not CalibrationData(tiny_data).has_labels
    with pytest.raises(ValueError, match="empty"):
        CalibrationData([])


def test_steps_take_options_objects_and_round_trip(tmp_path) -> None:
    import yaml

    from ptqkit.algorithms.adaquant import AdaQuantOptions
    from ptqkit.algorithms.lapq import LAPQOptions
    from ptqkit.pipeline import StepSpec

    r = Recipe(w_bits=4, steps=(AdaQuantOptions(iters=5), "bn_tuning",
                                LAPQOptions(p_grid=(2.0, 3.0, 4.0))))
    assert [s.name for s in r.steps] == ["adaquant", "bn_tuning", "lapq"]
    assert r.steps[0] == StepSpec("adaquant", {"iters": 5})  # only what differs from defaults
    assert r.with_steps(AdaQuantOptions(mode="parallel")).steps[-1].options == {"mode": "parallel"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r.to_dict()))
    back = Recipe.from_yaml(path)
    assert back == r and back.steps[2].build().options == LAPQOptions(p_grid=[2.0, 3.0, 4.0])
    assert StepSpec("adaquant", AdaQuantOptions()).options == {}
    with pytest.raises(ValueError, match="step 'lapq' takes LAPQOptions, got AdaQuantOptions"):
        StepSpec("lapq", AdaQuantOptions())


def test_steps_read_the_recipe_from_the_context(tiny: nn.Module, tiny_data) -> None:
    from ptqkit.algorithms import STEPS, Step
    from ptqkit.algorithms.base import Context

    seen: list[Recipe | None] = []

    class Probe(Step[object]):
        name = "probe"

        def run(self, ctx: Context) -> dict[str, object]:
            seen.append(ctx.recipe)
            return {}

    STEPS["probe"] = Probe
    try:
        recipe = Recipe(w_bits=4, a_range="minmax", steps=("probe",))
        ptqkit.quantize(tiny, tiny_data, recipe)
    finally:
        del STEPS["probe"]
    assert seen == [recipe]
