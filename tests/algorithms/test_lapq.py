from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit.algorithms.lapq import LAPQOptions, parabola_vertex
from ptqkit.calib.loss import calibration_loss, kl_to_float
from ptqkit.pipeline import Recipe, StepSpec


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny models run far faster on one thread on a loaded machine (no OpenMP spinning)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_parabola_vertex_hand_checked() -> None:
    ps = [2.0, 2.5, 3.0, 3.5, 4.0]
    assert parabola_vertex(ps, [2 * (p - 3.2) ** 2 + 1 for p in ps]) == pytest.approx(3.2)
    assert parabola_vertex(ps, [-(p - 3.0) ** 2 for p in ps]) is None  # opens downwards
    assert parabola_vertex(ps, [(p - 5.0) ** 2 for p in ps]) is None  # minimum outside the grid
    assert parabola_vertex(ps[:2], [1.0, 2.0]) is None


def test_calibration_loss_kl_and_ce() -> None:
    f = [torch.randn(4, 3), torch.randn(2, 3)]
    q = [t + 0.1 * torch.randn_like(t) for t in f]
    assert calibration_loss(f, f) == pytest.approx(0.0, abs=1e-7)
    expected = (float(kl_to_float(f[0], q[0])) * 4 + float(kl_to_float(f[1], q[1])) * 2) / 6
    assert calibration_loss(f, q) == pytest.approx(expected, rel=1e-6)
    y = [torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1])]
    ce = float(F.cross_entropy(torch.cat(q), torch.cat(y)) - F.cross_entropy(torch.cat(f), torch.cat(y)))
    assert calibration_loss(f, q, y) == pytest.approx(ce, rel=1e-5)
    assert calibration_loss(f, f, y) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="calibration batch 1 has no labels"):
        calibration_loss(f, q, [y[0], None])


def test_calibration_loss_weights_tokens_not_samples() -> None:
    f = [torch.randn(2, 5, 3), torch.randn(2, 1, 3)]  # 10 tokens, then 2
    q = [t + 0.3 * torch.randn_like(t) for t in f]
    flat = float(kl_to_float(torch.cat([t.reshape(-1, 3) for t in f]),
                             torch.cat([t.reshape(-1, 3) for t in q])))
    assert calibration_loss(f, q) == pytest.approx(flat, rel=1e-5)
    assert calibration_loss([], []) == 0.0


def _lapq(tiny: nn.Module, calib, **opts):  # type: ignore[no-untyped-def]
    recipe = Recipe(w_bits=3, a_bits=3, first_last_8bit=False, w_range="minmax",
                    a_range="minmax").with_steps(StepSpec("lapq", {"coarse": 10, "fine": 10, **opts}))
    q = ptqkit.quantize(tiny, calib, recipe)
    return q, q.report.steps[1]


def test_powell_never_worse_than_the_lp_init_and_respects_the_budget(tiny: nn.Module,
                                                                     tiny_data) -> None:
    q, s = _lapq(tiny, tiny_data, max_evals=40, powell_samples=None, init="lp")
    assert s["step"] == "lapq" and s["loss"] == "kl" and s["init"] == "lp"
    assert s["init_loss"] == min(s["p_losses"].values())  # best of the grid and the vertex
    assert s["final_loss"] <= s["init_loss"]
    assert 0 < s["evals"] <= 40 and s["optimised"] == 6  # 3 layers x (weights, inputs)
    with torch.no_grad():  # the reported loss is the model's real calibration loss
        assert float(kl_to_float(tiny(tiny_data), q(tiny_data))) == pytest.approx(
            s["final_loss"], rel=1e-4)
    assert q.report.layers["fc"]["a_range"].startswith("lapq(p=")


def test_best_init_starts_from_the_lowest_loss_candidate(tiny: nn.Module, tiny_data) -> None:
    q, s = _lapq(tiny, tiny_data, max_evals=0, powell_samples=None)
    losses = s["init_losses"]
    assert set(losses) == {"lp", "mse", "aciq"}
    assert losses["lp"] == min(s["p_losses"].values())  # the paper's Lp init is a candidate
    assert s["init"] == min(losses, key=losses.get) and s["init_loss"] == min(losses.values())
    assert s["final_loss"] == s["init_loss"]
    with torch.no_grad():  # the chosen candidate's ranges are the ones left in the model
        assert float(kl_to_float(tiny(tiny_data), q(tiny_data))) == pytest.approx(
            s["init_loss"], rel=1e-4)
    _, s2 = _lapq(tiny, tiny_data, max_evals=30, powell_samples=None)
    assert s2["final_loss"] <= s2["init_loss"] <= s["init_losses"]["lp"]
    with pytest.raises(ValueError, match="unknown LAPQ init 'minmax'"):
        LAPQOptions(init="minmax")


def test_tiny_budget_still_never_worse(tiny: nn.Module, tiny_data) -> None:
    _, s = _lapq(tiny, tiny_data, max_evals=2)
    assert s["evals"] == 2 and s["final_loss"] <= s["init_loss"]
    _, s0 = _lapq(tiny, tiny_data, max_evals=0)
    assert s0["evals"] == 0 and s0["final_loss"] == s0["init_loss"]


def test_cross_entropy_when_labels_are_given(tiny: nn.Module, tiny_data) -> None:
    y = torch.arange(64) % 4
    loader = [(tiny_data[i:i + 32], y[i:i + 32]) for i in (0, 32)]
    _, s = _lapq(tiny, loader, max_evals=5)
    assert s["loss"] == "ce"
    with pytest.raises(ValueError, match="needs labelled calibration batches"):
        _lapq(tiny, tiny_data, loss="ce")


class _Zero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 0.0


def test_all_zero_logits_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="outputs on the calibration set are all zero"):
        _lapq(_Zero(), torch.randn(16, 8))


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown LAPQ loss 'mse'"):
        LAPQOptions(loss="mse")
    with pytest.raises(ValueError, match="at least 3 values"):
        LAPQOptions(p_grid=(2.0, 3.0))
    with pytest.raises(ValueError, match="bounds"):
        LAPQOptions(bounds=(1.0, 2.0))


def test_prefix_cache_gives_the_same_result_as_full_evaluations(tiny: nn.Module, tiny_data) -> None:
    calib = [tiny_data[i:i + 16] for i in range(0, 64, 16)]
    q1, s1 = _lapq(tiny, calib, max_evals=12, cache_outputs=True, powell_samples=48)
    q2, s2 = _lapq(tiny, calib, max_evals=12, cache_outputs=False, powell_samples=48)
    assert s1["multipliers"] == s2["multipliers"] and s1["final_loss"] == s2["final_loss"]
    assert s1["p_losses"] == s2["p_losses"]
    with torch.no_grad():
        assert torch.equal(q1(tiny_data), q2(tiny_data))
    assert not any("forward" in vars(m) for m in q1.modules())  # wrappers removed


def test_result_is_never_worse_on_the_samples_powell_did_not_see(tiny: nn.Module,
                                                                 tiny_data) -> None:
    from ptqkit.algorithms.lapq import _held_out
    from ptqkit.calib.data import CalibrationData

    calib = [tiny_data[i:i + 16] for i in range(0, 64, 16)]
    held = _held_out(CalibrationData(calib), 32)
    assert held is not None and held.num_samples == 32
    assert torch.equal(held.batches[0], calib[2])
    assert _held_out(CalibrationData(calib), 64) is None
    _, s = _lapq(tiny, calib, max_evals=20, powell_samples=32)
    assert s["init_held_loss"] is not None and s["final_loss"] <= s["init_loss"]
    if s["multipliers"]:  # Powell's result kept: not worse on the unseen half either
        assert s["final_held_loss"] <= s["init_held_loss"]
