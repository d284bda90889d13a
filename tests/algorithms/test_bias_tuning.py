from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqkit.algorithms.bias_tuning import BiasTuningOptions, _kl, split_holdout, tune_biases
from ptqkit.calib.data import CalibrationData
from ptqkit.nn.control import quantizers_disabled
from ptqkit.pipeline import Recipe, quantize


def test_split_holdout_by_hand() -> None:
    assert split_holdout(10, 0.1) == (list(range(9)), [9])
    assert split_holdout(4, 0.5) == ([0, 1], [2, 3])
    assert split_holdout(2, 0.9) == ([0], [1])  # always at least one training batch
    assert split_holdout(1, 0.1) == ([0], [0])  # nothing to hold out
    with pytest.raises(ValueError, match="holdout"):
        BiasTuningOptions(holdout=1.0)


def _setup(tiny: nn.Module, tiny_data: torch.Tensor) -> tuple[nn.Module, CalibrationData, list]:
    data = CalibrationData(tiny_data, batch_size=16)
    q = quantize(tiny, data, Recipe(w_bits=3, a_bits=3))
    with quantizers_disabled(q), torch.no_grad():
        teacher = [data.forward(q, b) for b in data]  # per-sample float logits
    with torch.no_grad():
        q.fc.bias.add_(torch.tensor([0.5, -0.5, 0.3, 0.0]))  # an error only a bias can undo
    return q, data, teacher


def test_never_worse_on_held_out_and_only_biases_change(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    q, data, teacher = _setup(tiny, tiny_data)
    before = copy.deepcopy(q.state_dict())
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    opts = BiasTuningOptions(iters=40, lr=1e-2, holdout=0.25, eval_every=5)
    out = tune_biases(q, data, teacher, opts)
    assert out["held_out"] and out["kl_after"] < 0.5 * out["kl_before"]
    assert _kl(q, data, teacher, [3]) == pytest.approx(out["kl_after"], rel=1e-5)
    for k, v in q.state_dict().items():
        if not k.endswith("bias"):
            assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags


def test_absurd_learning_rate_keeps_the_start(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    q, data, teacher = _setup(tiny, tiny_data)
    out = tune_biases(q, data, teacher, BiasTuningOptions(iters=3, lr=1e4, holdout=0.25, eval_every=1))
    assert out["kl_after"] <= out["kl_before"]
    assert _kl(q, data, teacher, [3]) == pytest.approx(out["kl_after"], rel=1e-5)


def test_step_in_pipeline_single_batch_notes_no_holdout(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    recipe = Recipe(w_bits=4, a_bits=4).with_steps({"name": "bias_tuning", "options": {"iters": 5}})
    q = quantize(tiny, tiny_data[:8], recipe)
    step = q.report.steps[1]
    assert step["step"] == "bias_tuning" and not step["held_out"]
    assert step["kl_after"] <= step["kl_before"]
    assert any("nothing held out" in n for n in q.report.notes)
