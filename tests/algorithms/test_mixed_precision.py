from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.algorithms import ip, sensitivity
from ptqkit.algorithms.ip import Budget, InfeasibleBudgetError, SensitivityTable
from ptqkit.algorithms.mixed_precision import MixedPrecisionOptions, Planner, range_tuner
from ptqkit.calib.data import CalibrationData
from ptqkit.nn.modules import quant_layers
from ptqkit.pipeline import Recipe, StepSpec


def _table(loss, params, options=((8, 8), (4, 4)), macs=None) -> SensitivityTable:
    loss = np.asarray(loss, dtype=float)
    return SensitivityTable([f"l{i}" for i in range(len(params))], list(options), loss,
                            np.asarray(params), np.asarray(macs if macs is not None else params),
                            np.ones_like(loss, dtype=bool))


def _random_table(seed: int, layers: int = 4) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    options = [(8, 8), (6, 6), (4, 4), (2, 2)]
    loss = np.sort(rng.random((layers, len(options))) * rng.random((layers, 1)), axis=1)
    return _table(loss, rng.integers(10, 1000, layers), options, rng.integers(10, 1000, layers))


# ------------------------------------------------------------------ candidates and budgets
def test_candidate_sets_and_bad_input() -> None:
    assert ip.candidate_options("default") == [(8, 8), (4, 4)]
    relaxed = ip.candidate_options("relaxed")
    assert len(relaxed) == 49 and (2, 8) in relaxed and (8, 2) in relaxed
    assert ip.candidate_options("w8a8, w4a8") == [(8, 8), (4, 8)]
    with pytest.raises(ValueError, match="candidate set is empty"):
        ip.candidate_options("")
    with pytest.raises(ValueError, match="candidate set is empty"):
        ip.candidate_options([])
    with pytest.raises(ValueError, match="2..8"):
        ip.candidate_options([(1, 8)])
    with pytest.raises(ValueError, match="w4a8"):
        ip.candidate_options("4-8")


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_budget_outside_unit_interval(value: float) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Budget("compression", value)
    with pytest.raises(ValueError, match="exactly one budget"):
        MixedPrecisionOptions()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        MixedPrecisionOptions(bops=value)


# ------------------------------------------------------------------ the integer program
def test_ip_hand_checked_instance() -> None:
    # sizes 100 and 300 params; all-8 = 0.25, all-4 = 0.125. Budget 0.2 -> 3200 bits allowed:
    # l0 at 4 bits = 400 + 2400 = 2800 bits (loss 0.5 + 0), l1 at 4 = 800 + 1200 = 2000 (loss 0.1).
    t = _table([[0.0, 0.5], [0.0, 0.1]], [100, 300])
    sol = ip.solve_ip(t, Budget("compression", 0.2))
    assert sol.choice == [0, 1] and "Optimal" in sol.status
    assert sol.predicted["loss"] == pytest.approx(0.1)
    assert sol.predicted["compression"] == pytest.approx(2000 / (400 * 32))
    # eq. 5 form: smallest model with predicted loss <= 0.3 -> only l1 lowered
    sol = ip.solve_ip(t, Budget("loss", 0.3))
    assert sol.choice == [0, 1]
    assert ip.solve_ip(t, Budget("loss", 0.6)).choice == [1, 1]


@pytest.mark.parametrize("seed", range(6))
def test_ip_matches_brute_force(seed: int) -> None:
    t = _random_table(seed)
    for budget in (Budget("compression", 0.14), Budget("compression", 0.2), Budget("bops", 0.03)):
        best = ip.brute_force(t, budget)
        sol = ip.solve_ip(t, budget)
        assert sol.predicted[budget.kind] <= budget.value + 1e-12
        assert sol.predicted["loss"] == pytest.approx(best.predicted["loss"], rel=1e-7, abs=1e-12)
        for greedy in (ip.greedy_accuracy, ip.greedy_compression):
            g = greedy(t, budget)
            assert g.predicted[budget.kind] <= budget.value + 1e-12
            assert sol.predicted["loss"] <= g.predicted["loss"] + 1e-12
    loss_budget = Budget("loss", float(t.loss[:, 1].sum()))
    best = ip.brute_force(t, loss_budget)
    sol = ip.solve_ip(t, loss_budget)
    assert sol.predicted["loss"] <= loss_budget.value + 1e-12
    assert sol.predicted["compression"] == pytest.approx(best.predicted["compression"])


@pytest.mark.parametrize("seed", range(3))
def test_ip_alternatives_are_the_k_best(seed: int) -> None:
    from itertools import product

    t = _random_table(seed)
    budget = Budget("compression", 0.16)
    feasible = sorted(t.evaluate(c)["loss"] for c in product(range(4), repeat=4)
                      if t.evaluate(c)["compression"] <= 0.16 + 1e-12)
    sols = ip.ip_alternatives(t, budget, 5)
    assert len({tuple(s.choice) for s in sols}) == 5
    np.testing.assert_allclose([s.predicted["loss"] for s in sols], feasible[:5], rtol=1e-7, atol=1e-12)
    # fewer configurations than asked: all of them, then stop
    assert len(ip.ip_alternatives(_table([[0, 1.0], [0, 2.0]], [1, 1]), Budget("compression", 0.2), 9)) == 3
    with pytest.raises(ValueError, match=">= 1"):
        ip.ip_alternatives(t, budget, 0)


def test_table_reordered_by_name() -> None:
    t = _table([[0.0, 0.5], [0.0, 0.1]], [100, 300])
    r = t.reordered(["l1", "l0"])
    assert r.layers == ["l1", "l0"] and r.loss[0, 1] == 0.1 and r.params.tolist() == [300, 100]
    with pytest.raises(ValueError, match="measure the table again"):
        t.reordered(["l0", "x"])


def test_infeasible_budget_names_smallest_value() -> None:
    t = _table([[0.0, 0.5], [0.0, 0.1]], [100, 300])
    with pytest.raises(InfeasibleBudgetError, match=r"feasible compression with these candidates is 0\.125"):
        ip.solve_ip(t, Budget("compression", 0.1))
    with pytest.raises(InfeasibleBudgetError, match="feasible loss with these candidates is 0.1"):
        ip.greedy_accuracy(_table([[0.1, 0.5], [0.0, 0.1]], [1, 1]), Budget("loss", 0.05))


def test_greedy_baselines_hand_checked() -> None:
    # l0 small but robust, l1 large and sensitive, l2 large and robust
    t = _table([[0, 0.01], [0, 1.0], [0, 0.02]], [10, 100, 100])
    budget = Budget("compression", (10 * 4 + 100 * 8 + 100 * 4) / (210 * 32))
    acc = ip.greedy_accuracy(t, budget)   # lowers l0, then l2 (least sensitive first)
    comp = ip.greedy_compression(t, budget)  # all at 4, raise l0 (smallest); l1, l2 do not fit
    assert acc.choice == [1, 0, 1]
    assert comp.choice == [0, 1, 1] and comp.predicted["loss"] == pytest.approx(1.02)
    assert ip.solve_ip(t, budget).choice == [1, 0, 1]


def test_table_json_roundtrip(tmp_path) -> None:
    t = _random_table(0)
    t.meta["loss"] = "kl"
    t.save(tmp_path / "t.json")
    back = SensitivityTable.load(tmp_path / "t.json")
    assert back.layers == t.layers and back.options == t.options and back.meta == t.meta
    np.testing.assert_array_equal(back.loss, t.loss)


# ------------------------------------------------------------------ measurement on a model
def _prepared(tiny: nn.Module, data: torch.Tensor) -> nn.Module:
    return ptqkit.quantize(tiny, data, Recipe(first_last_8bit=False))


def _planner(tiny: nn.Module, data: torch.Tensor) -> tuple[nn.Module, Planner]:
    """A prepared copy of ``tiny`` and a range-tuning Planner on ``data`` with float references."""
    q = _prepared(tiny, data)
    calib = CalibrationData(data)
    with torch.no_grad():
        ref = [tiny(b) for b in calib]
    return q, Planner(q, calib, ref, "auto", range_tuner())


def test_suffix_pass_equals_full_pass(tiny: nn.Module, tiny_data, monkeypatch, caplog) -> None:
    q = _prepared(tiny, tiny_data)
    calib = CalibrationData(tiny_data, batch_size=16)
    with torch.no_grad():
        ref = [tiny(b) for b in calib]
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in quant_layers(q).items()}
    names = list(quant_layers(q))
    req = sensitivity.TableRequest([(8, 8), (3, 3)], {n: [(8, 8), (3, 3)] for n in names}, "kl",
                                   range_tuner())
    with caplog.at_level(logging.INFO, logger=sensitivity.__name__):
        fast, states = sensitivity.measure_table(q, calib, ref, req)
    lines = [r.getMessage() for r in caplog.records if r.name == sensitivity.__name__]
    assert lines[-1].startswith(f"sensitivity table: {2 * len(names)}/{2 * len(names)} entries "
                                f"({len(names)}/{len(names)} layers)") and "ETA 0 s" in lines[-1]
    monkeypatch.setattr(sensitivity.SuffixRunner, "_split", lambda self, layer: None)
    slow, _ = sensitivity.measure_table(q, calib, ref, req)
    np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-4, atol=1e-9)
    assert (fast.loss[:, 1] > fast.loss[:, 0]).all()  # 3 bits hurts more than 8
    assert fast.params.tolist() == [72, 72, 32] and fast.macs.tolist() == [4608, 4608, 32]
    assert states[("dw", (3, 3))].option == (3, 3)
    for n, m in quant_layers(q).items():  # every layer restored bit-exactly
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[n][k]), (n, k)


def _mp(**opts) -> Recipe:
    return Recipe(first_last_8bit=False).with_steps(StepSpec("mixed_precision", opts))


def test_step_meets_budget_and_reports(tiny: nn.Module, tiny_data, tmp_path) -> None:
    path = str(tmp_path / "table.json")
    q = ptqkit.quantize(tiny, tiny_data, _mp(compression=0.15, candidates="w8a8,w4a4,w2a8",
                                             save_table=path))
    s = q.report.steps[1]
    assert s["predicted"]["compression"] <= 0.15 and "Optimal" in s["status"]
    layers = quant_layers(q)
    assert {n: f"w{m.w_bits}a{m.a_bits}" for n, m in layers.items()} == s["bits"]
    assert all(m.w_quant.active and m.a_quant.active for m in layers.values())
    assert s["measured_loss"] > 0 and s["predicted"]["loss"] > 0
    # reload the table: same choice, no measurement
    q2 = ptqkit.quantize(tiny, tiny_data, _mp(compression=0.15, candidates="w8a8,w4a4,w2a8",
                                              load_table=path))
    assert q2.report.steps[1]["bits"] == s["bits"]
    torch.testing.assert_close(q2(tiny_data), q(tiny_data), rtol=0, atol=0)


def test_step_pins_and_bad_overrides(tiny: nn.Module, tiny_data) -> None:
    q = ptqkit.quantize(tiny, tiny_data, Recipe().with_steps(
        StepSpec("mixed_precision", {"compression": 0.2, "fixed": {"dw": (4, 8)}})))
    assert q.report.steps[1]["bits"] == {"conv1": "w8a8", "dw": "w4a8", "fc": "w8a8"}
    with pytest.raises(ValueError, match=r"fixed bits name no quantized layer: \['nope'\]"):
        ptqkit.quantize(tiny, tiny_data, _mp(compression=0.2, fixed={"nope": (4, 4)}))
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible compression"):
        ptqkit.quantize(tiny, tiny_data, _mp(compression=0.05))


def test_closed_loop_tightens(tiny: nn.Module, tiny_data) -> None:
    q = ptqkit.quantize(tiny, tiny_data, _mp(max_drop=1e-4, loss_budget=1.0,
                                             candidates="w8a8,w2a2"))
    rounds = q.report.steps[1]["rounds"]
    assert len(rounds) >= 2 and rounds[0]["measured_drop"] > 1e-4
    assert all(b["loss_budget"] < a["loss_budget"] for a, b in zip(rounds, rounds[1:]))
    assert rounds[-1]["measured_drop"] <= 1e-4 or len(rounds) == 4


def test_planner_apply_to_copy_is_isolated(tiny: nn.Module, tiny_data) -> None:
    import copy

    q, s = _planner(tiny, tiny_data)
    s.measure([(8, 8), (2, 2)], {n: [(8, 8), (2, 2)] for n in quant_layers(q)})
    out0 = q(tiny_data)
    low = s.apply(s.solve(Budget("compression", 0.0625)), copy.deepcopy(q))
    assert all(m.w_bits == 2 for m in quant_layers(low).values())
    torch.testing.assert_close(q(tiny_data), out0, rtol=0, atol=0)
    assert s.measured_loss(low) > s.measured_loss(q)


def test_solve_measured_picks_lowest_measured_loss(tiny: nn.Module, tiny_data, monkeypatch) -> None:
    q, s = _planner(tiny, tiny_data)
    s.measure([(8, 8), (4, 4), (2, 2)], {n: [(8, 8), (4, 4), (2, 2)] for n in quant_layers(q)})
    sol, alts = s.solve_measured(Budget("compression", 0.15), "ip", 4)
    assert len(alts) == 4 and alts[0]["predicted_loss"] <= min(a["predicted_loss"] for a in alts)
    assert s.measured_loss(q) == pytest.approx(min(a["measured_loss"] for a in alts), abs=0)
    assert layer_bits_of(q) == sol.bits(s.table)
    plain, none = s.solve_measured(Budget("compression", 0.15), "ip", 1)
    assert none == [] and plain.predicted["loss"] == alts[0]["predicted_loss"]


def test_planner_states_roundtrip(tiny: nn.Module, tiny_data, tmp_path) -> None:
    q, s = _planner(tiny, tiny_data)
    s.measure([(8, 8), (2, 2)], {n: [(8, 8), (2, 2)] for n in quant_layers(q)})
    s.save_states(tmp_path / "s.pt")
    states = Planner.load_states(tmp_path / "s.pt")
    assert set(states) == set(s.states)
    for k, st in states.items():
        assert st.option == s.states[k].option
        for name, v in st.tensors.items():
            assert torch.equal(v, s.states[k].tensors[name])
    torch.save({"version": 99}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="delete it"):
        Planner.load_states(tmp_path / "bad.pt")


def layer_bits_of(q: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.w_bits, m.a_bits) for n, m in quant_layers(q).items()}


# ------------------------------------------------------------------ pipelines
def test_light_and_advanced_presets(tiny: nn.Module, tiny_data) -> None:
    from ptqkit.sweep import with_mixed_precision

    light = with_mixed_precision(Recipe.preset("light", first_last_8bit=False), compression=0.15)
    assert [s.name for s in light.steps] == ["mixed_precision", "bn_tuning"]
    q = ptqkit.quantize(tiny, tiny_data, light)
    assert [s["step"] for s in q.report.steps][:3] == ["ranges", "mixed_precision", "bn_tuning"]
    assert q.report.steps[1]["predicted"]["compression"] <= 0.15
    adv = with_mixed_precision(Recipe.preset("advanced", first_last_8bit=False), compression=0.15,
                               tuner_options={"iters": 4, "eval_every": 2})
    qa = ptqkit.quantize(tiny, tiny_data, adv)
    assert [s["step"] for s in qa.report.steps][:4] == ["ranges", "mixed_precision", "bn_tuning",
                                                        "bias_tuning"]
    assert qa.report.steps[1]["predicted"]["compression"] <= 0.15


def test_cli_flags_set_the_budget() -> None:
    from ptqkit.cli import build_parser, recipe_from_args

    args = build_parser().parse_args(["quantize", "m", "--out", "x", "--pipeline", "light",
                                      "--max-drop", "0.5", "--candidates", "relaxed"])
    step = recipe_from_args(args).steps[0]
    assert step.name == "mixed_precision"
    assert dict(step.options) == {"max_drop": 0.5, "candidates": "relaxed"}


# ------------------------------------------------------------------ context refinement
def test_neighbour_mask_adjacent_and_all() -> None:
    t = _table(np.zeros((2, 4)), [10, 10], options=[(8, 8), (4, 4), (3, 3), (2, 2)])
    adj = ip.neighbour_mask(t, [1, 0], "adjacent")
    # w4a4 -> w8a8 and w3a3 (one step in the sorted bits 2,3,4,8); w8a8 -> w4a4 only
    assert adj.tolist() == [[True, False, True, False], [False, True, False, False]]
    assert ip.neighbour_mask(t, [1, 0], "all").tolist() == [[True, False, True, True],
                                                             [False, True, True, True]]
    relaxed = _table(np.zeros((1, 49)), [10], options=ip.candidate_options("relaxed"))
    grid = ip.neighbour_mask(relaxed, [relaxed.options.index((4, 4))], "adjacent")
    assert sorted(relaxed.options[o] for o in np.nonzero(grid[0])[0]) == [
        (3, 3), (3, 4), (3, 5), (4, 3), (4, 5), (5, 3), (5, 4), (5, 5)]
    with pytest.raises(ValueError, match="adjacent"):
        ip.neighbour_mask(t, [0, 0], "near")


def test_local_table_and_trust_region() -> None:
    t = _table([[0.0, 0.1], [0.0, 0.2], [0.0, 0.3]], [100, 100, 100])
    budget = Budget("compression", (8 + 4 + 4) * 100 / (300 * 32))  # two layers at 4 bits
    assert ip.solve_ip(t, budget).choice == [1, 1, 0]
    # in context of [1, 1, 0]: raising l1 saves 0.5, lowering l2 costs 0.1 (l0 not measured)
    local = ip.local_table(t, [1, 1, 0], np.array([[np.nan, np.nan], [-0.5, np.nan], [np.nan, 0.1]]))
    assert local.allowed.tolist() == [[False, True], [True, True], [True, True]]
    assert local.loss.tolist() == [[0.0, 0.0], [-0.5, 0.0], [0.0, 0.1]]
    sol = ip.solve_ip(local, budget)
    assert sol.choice == [1, 0, 1] and sol.predicted["loss"] == pytest.approx(-0.4)
    # at most one change: raising l1 alone breaks the budget, lowering l2 alone costs 0.1: stay
    assert ip.solve_ip(local, budget, near=([1, 1, 0], 1)).choice == [1, 1, 0]
    loose = Budget("compression", 0.25)  # now raising l1 alone fits
    assert ip.solve_ip(local, loose, near=([1, 1, 0], 1)).choice == [1, 0, 0]
    assert ip.changed([1, 0, 1], [1, 1, 0]) == 2
    with pytest.raises(ValueError, match="deltas must be"):
        ip.local_table(t, [0, 0, 0], np.zeros((2, 2)))


class Branches(nn.Module):
    """out = a(x) + b(x) + c(x) with a and b identical: their weight-quantization errors are
    identical and add coherently, so lowering both costs ~4x one of them (KL ~ quadratic in the
    logit error), not the 2x the additive table predicts; c (30% larger weights, independent
    errors) costs a bit more alone but combines additively."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 10), nn.Linear(16, 10), nn.Linear(16, 10)
        with torch.no_grad():
            w = torch.randn(10, 16, generator=g) * 0.3
            self.a.weight.copy_(w)
            self.b.weight.copy_(w)
            self.c.weight.copy_(torch.randn(10, 16, generator=g) * 0.39)
            for m in (self.a, self.b, self.c):
                m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(x)


def _branches_planner() -> tuple[nn.Module, Planner]:
    model = Branches().eval()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    q = ptqkit.quantize(model, x, Recipe(first_last_8bit=False))
    calib = CalibrationData(x, batch_size=64)
    with torch.no_grad():
        ref = [model(b) for b in calib]
    s = Planner(q, calib, ref, "kl", range_tuner())
    s.measure([(8, 8), (2, 8)], {n: [(8, 8), (2, 8)] for n in quant_layers(q)})
    return q, s


TWO_LOW = Budget("compression", (8 + 2 + 2) / (3 * 32))  # any two of the three layers at 2 bits


def test_refine_finds_the_interacting_pair() -> None:
    from ptqkit.algorithms.mixed_precision import RefineOptions

    q, s = _branches_planner()
    la, lb, lc = s.table.loss[:, 1]
    assert la == lb < lc  # the table ranks a, b cheapest: the paper's IP lowers both
    plain, _ = s.solve_measured(TWO_LOW, "ip")
    assert plain.choice == [1, 1, 0]
    coherent = s.measured_loss(q)
    assert 3.5 * la < coherent < 4.5 * la  # measured ~4x one layer, predicted 2x
    sol, _ = s.solve_measured(TWO_LOW, "ip", refine_opts=RefineOptions(rounds=3, samples=None))
    assert sol.choice in ([1, 0, 1], [0, 1, 1]) and sol.predicted["compression"] <= TWO_LOW.value
    assert sol.measured == s.measured_loss(q) < 0.7 * coherent  # model holds the refined choice
    assert sol.measured == pytest.approx(la + lc, rel=0.15)  # independent errors: additive again
    r0, r1 = sol.refine[0], sol.refine[1]
    assert r0["measured_loss"] == coherent and r1["accepted"] and r1["attempts"][0]["changed"] == 2
    assert not sol.refine[-1]["accepted"] and "refined in context" in sol.status


def test_refine_rounds_zero_is_the_paper_ip(tiny: nn.Module, tiny_data) -> None:
    cands = "w8a8,w4a4,w2a2"
    q0 = ptqkit.quantize(tiny, tiny_data, _mp(compression=0.12, candidates=cands, refine_rounds=0))
    q, s = _planner(tiny, tiny_data)
    s.measure(ip.candidate_options(cands), {n: ip.candidate_options(cands) for n in quant_layers(q)})
    sol = ip.solve_ip(s.table, Budget("compression", 0.12))
    s.apply(sol)
    assert q0.report.steps[1]["bits"] == {n: f"w{w}a{a}" for n, (w, a) in sol.bits(s.table).items()}
    assert q0.report.steps[1]["refine"] == []
    torch.testing.assert_close(q0(tiny_data), q(tiny_data), rtol=0, atol=0)


@pytest.mark.parametrize("budget", [0.2, 0.12, 0.08])
def test_refine_never_worse_with_alternatives(tiny: nn.Module, tiny_data, budget: float) -> None:
    from ptqkit.algorithms.mixed_precision import RefineOptions

    q, s = _planner(tiny, tiny_data)
    opts = [(8, 8), (4, 4), (3, 3), (2, 2)]
    s.measure(opts, {n: opts for n in quant_layers(q)})
    sol, alts = s.solve_measured(Budget("compression", budget), "ip", 3,
                                 refine_opts=RefineOptions(rounds=3, samples=32, neighbours="all"))
    start = min(a["measured_loss"] for a in alts)  # refinement starts from the measured-best
    assert sol.refine[0]["measured_loss"] == start and sol.measured <= start
    assert sol.predicted["compression"] <= budget + 1e-12
    assert s.measured_loss(q) == sol.measured
    accepted = [r["measured_loss"] for r in sol.refine if r["accepted"]]
    assert accepted == sorted(accepted, reverse=True)  # each accepted round strictly lowers it


def test_closed_loop_with_refinement(tiny: nn.Module, tiny_data) -> None:
    q = ptqkit.quantize(tiny, tiny_data, _mp(max_drop=1e-4, loss_budget=1.0, candidates="w8a8,w2a2",
                                             refine_rounds=2, refine_samples=None))
    rounds = q.report.steps[1]["rounds"]
    assert len(rounds) >= 2 and all(r["refine"] for r in rounds)
    for r in rounds:  # refinement keeps the size and never raises the loss
        assert r["refine"][-1]["measured_loss"] <= r["refine"][0]["measured_loss"]
    with pytest.raises(ValueError, match="refine_rounds must be >= 0"):
        MixedPrecisionOptions(compression=0.2, refine_rounds=-1)
    with pytest.raises(ValueError, match="refine_neighbours"):
        MixedPrecisionOptions(compression=0.2, refine_neighbours="near")


def test_context_deltas_equal_full_passes(tiny: nn.Module, tiny_data) -> None:
    """The cached quantized prefix + suffix pass gives the same dL_c as stitching the switched
    configuration and running the whole model (here with AdaQuant states: weights change too)."""
    import copy

    from ptqkit.algorithms.mixed_precision import _adaquant_tuner
    from ptqkit.algorithms.sensitivity import measure_in_context

    q = _prepared(tiny, tiny_data)
    calib = CalibrationData(tiny_data)
    with torch.no_grad():
        ref = [tiny(b) for b in calib]
    s = Planner(q, calib, ref, "kl", _adaquant_tuner({}, 0, {"iters": 3, "eval_every": 1}))
    opts = [(8, 8), (4, 4), (2, 2)]
    s.measure(opts, {n: opts for n in quant_layers(q)})
    choice = [1, 2, 0]
    model = s.apply(ip.Solution(choice, "ip", "", {}, Budget("compression", 1.0)), copy.deepcopy(q))
    layers, names = quant_layers(model), list(quant_layers(model))
    current = {n: opts[c] for n, c in zip(names, choice)}

    def switch(name, option):
        s.put(layers[name], name, current[name] if option is None else option)

    probes = {n: [o for o in opts if o != current[n]] for n in names}
    base, deltas = measure_in_context(model, calib, ref, "kl", probes, switch)
    assert base == pytest.approx(s.measured_loss(model), rel=1e-6)
    for (name, option), d in deltas.items():
        moved = list(choice)
        moved[names.index(name)] = opts.index(option)
        full = s.measured_loss(s.apply(ip.Solution(moved, "ip", "", {}, Budget("compression", 1.0)),
                                       copy.deepcopy(q)))
        assert d == pytest.approx(full - base, rel=1e-4, abs=1e-9), (name, option)
    assert s.measured_loss(model) == base  # every layer switched back


def test_an_infeasible_budget_fails_before_the_table_is_measured(tiny: nn.Module, tiny_data,
                                                                 monkeypatch) -> None:
    def no_table(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the sensitivity table was measured")

    monkeypatch.setattr(Planner, "measure", no_table)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible compression"):
        ptqkit.quantize(tiny, tiny_data, Recipe().with_steps(
            StepSpec("mixed_precision", {"compression": 0.01})))
