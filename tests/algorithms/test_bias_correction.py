from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import ptqkit
from ptqkit.algorithms.base import Context, Report
from ptqkit.algorithms.bias_correction import (
    BiasCorrection,
    BiasCorrectionOptions,
    _linear_in_x,
    _plan,
    _undo_handle,
    banner_correction,
    calibration_kl,
    channel_rows,
    checked_xi,
    mean_output_errors,
    summed_error,
)
from ptqkit.calib.data import CalibrationData
from ptqkit.nn.control import quantizers_disabled
from ptqkit.nn.modules import quant_layers
from ptqkit.pipeline import Recipe


def test_banner_correction_hand_checked() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    w_q = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    xi, d = banner_correction(w, w_q)
    assert float(xi[0]) == pytest.approx(1.25**0.5)  # std 1.118 / std 1
    assert float(d[0]) == pytest.approx(2.5 - 1.25**0.5 * 2.0)
    fixed = xi[:, None] * w_q + d[:, None]
    assert_close(fixed.mean(1), w.mean(1))
    assert_close(fixed.std(1, unbiased=False), w.std(1, unbiased=False))
    xi, d = banner_correction(w, torch.full_like(w, 2.0))  # constant channel: no rescaling
    assert float(xi[0]) == 1.0 and float(d[0]) == pytest.approx(0.5)


def _biased_layer(mode: str, activations: bool = False,
                  spread: float = 0.02):  # type: ignore[no-untyped-def]
    """A Linear whose weights (0.3 +- 0.02) all round down to 0.25: a known biased error of
    -0.05 per weight; inputs with mean 1, so the output mean error is about -0.05 * 16."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 4)).eval()
    with torch.no_grad():
        net[0].weight.copy_(0.3 + spread * torch.randn(4, 16, generator=g).clamp(-2, 2))
    x = 1.0 + 0.3 * torch.randn(512, 16, generator=g)
    q = ptqkit.quantize(net, x, Recipe(w_bits=4, a_bits=3, first_last_8bit=False,
                                       w_range="minmax", a_range="minmax"))
    layer = quant_layers(q)["0"]
    layer.w_quant.set_qparams(torch.full((4,), 0.25), torch.zeros(4))
    ctx = Context(q, CalibrationData(x), Report())
    return net, q, layer, x, ctx, BiasCorrection(BiasCorrectionOptions(mode, activations))


@torch.no_grad()
def _mean_error(net: nn.Module, q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with quantizers_disabled(q, "activations"):
        return (q(x) - net(x)).mean(0)


@torch.no_grad()
def test_empirical_correction_removes_the_output_mean_error() -> None:
    net, q, layer, x, ctx, step = _biased_layer("empirical")
    before = _mean_error(net, q, x)
    assert (before < -0.6).all()  # about -0.8 per output
    codes = layer.w_quant.int_repr(layer.weight)
    step.run(ctx)
    assert _mean_error(net, q, x).abs().max() < 1e-5
    held_out = 1.0 + 0.3 * torch.randn(2000, 16, generator=torch.Generator().manual_seed(9))
    assert _mean_error(net, q, held_out).abs().max() < 0.02
    assert torch.equal(layer.w_quant.int_repr(layer.weight), codes)  # weights untouched


@torch.no_grad()
def test_empirical_with_activation_error_zeroes_the_full_layer_error() -> None:
    net, q, layer, x, ctx, step = _biased_layer("empirical", activations=True)
    full = lambda: (q(x) - net(x)).mean(0)  # noqa: E731
    assert full().abs().max() > 0.5
    step.run(ctx)
    assert full().abs().max() < 1e-4


@torch.no_grad()
def test_banner_folds_xi_into_the_scale_and_keeps_codes() -> None:
    net, q, layer, x, ctx, step = _biased_layer("banner", spread=0.1)
    step = BiasCorrection(BiasCorrectionOptions("banner", robust=False))  # the paper's xi as is
    w0 = layer.weight.clone()
    before = _mean_error(net, q, x).abs().max()
    codes, scale = layer.w_quant.int_repr(w0), layer.w_quant.scale.clone()
    w_q0 = layer.w_quant(w0)
    xi, d = banner_correction(w0, w_q0)
    step.run(ctx)
    assert torch.equal(layer.w_quant.int_repr(layer.weight), codes)
    assert_close(layer.w_quant.scale, scale * xi)
    rep = layer.w_quant(layer.weight)  # xi * W~: the spread of the float weights, exactly
    assert_close(rep.std(1, unbiased=False), w0.std(1, unbiased=False), rtol=1e-5, atol=1e-6)
    # the mean residual d went into the bias through the input mean: output mean error ~ 0
    assert _mean_error(net, q, x).abs().max() < 0.05 * before
    info = ctx.report.layers["0"]["bias_correction"]
    assert info["xi_min"] == pytest.approx(float(xi.min()))


def test_pipeline_step_and_options() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(32, 1, 4, 4)
    q = ptqkit.quantize(net, x, Recipe(w_bits=3, a_bits=8, first_last_8bit=False)
                        .with_steps({"name": "bias_correction", "options": {"mode": "both"}}))
    assert [s["step"] for s in q.report.steps][:2] == ["ranges", "bias_correction"]
    assert set(q.report.layers["0"]["bias_correction"]) == {"xi_min", "xi_max", "xi_channels", "kept",
                                                                "bias_shift_max", "shifted_channels"}
    with pytest.raises(ValueError, match="unknown bias-correction mode 'mean'"):
        BiasCorrectionOptions(mode="mean")


class _TokenNet(nn.Module):
    """A Linear applied to token states (N, T, C), called with a Hugging Face style batch."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _token_setup(weight: torch.Tensor, batches: list[dict[str, torch.Tensor]], step_q: float,
                 **opts: object):  # type: ignore[no-untyped-def]
    """Quantize _TokenNet with a fixed weight grid of step ``step_q`` (zero-point 0, 4 bits)."""
    net = _TokenNet(weight).eval()
    calib = CalibrationData(batches)
    q = ptqkit.quantize(net, calib, Recipe(w_bits=4, a_bits=8, first_last_8bit=False,
                                           w_range="minmax", a_range="minmax"))
    layer = quant_layers(q)["proj"]
    layer.w_quant.set_qparams(torch.full((weight.shape[0],), step_q), torch.zeros(weight.shape[0]))
    ctx = Context(q, calib, Report())
    opts = {"guard": False, **opts}  # these tests check the statistics, not the loss guard
    return net, q, layer, ctx, BiasCorrection(BiasCorrectionOptions("empirical", **opts))


@torch.no_grad()
def test_linear_on_token_states_uses_the_feature_axis_and_only_real_tokens() -> None:
    """(N, T, C) input: the bias shift is per output feature (last axis) and averages over real
    tokens only - padded positions hold garbage states that must not move the bias."""
    w = torch.tensor([[0.3, 0.3], [0.55, 0.7]])  # grid 0.25: errors -0.05, -0.05 | -0.05, +0.05
    x = torch.ones(2, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    x[mask == 0] = torch.tensor([1000.0, -500.0])  # padding: huge, would dominate any mean
    net, q, layer, ctx, step = _token_setup(w, [{"x": x, "attention_mask": mask}], 0.25)
    step.run(ctx)
    # real tokens see x = (1, 1): error -0.1 on feature 0 and 0.0 on feature 1 (w~ = .25, .25 |
    # .5, .75); the bias absorbs exactly that
    assert_close(layer.bias, torch.tensor([0.1, 0.0]), rtol=0, atol=1e-6)


@torch.no_grad()
def test_robust_correction_ignores_an_error_carried_by_one_token() -> None:
    """Feature 0 has a massive activation on token 0 only (input dim 1 = 100 there) through a
    large weight that the grid clips: the mean error is driven by that one token. A shift of the
    mean would move the 7 other tokens; the robust check keeps feature 0's bias, while feature
    1's error is the same on every token and is still corrected."""
    w = torch.tensor([[0.3, 2.0], [0.3, 0.0]])  # grid 0.1, codes 0..15: 2.0 clips to 1.5
    x = torch.zeros(4, 8, 2)
    x[..., 0] = 1.0
    x[:, 0, 1] = 100.0  # the massive activation, on the first token of every sequence
    batches = [{"x": x, "attention_mask": torch.ones(4, 8)}]
    _, _, layer, ctx, step = _token_setup(w, batches, 0.1, robust=True)
    step.run(ctx)
    assert float(layer.bias[0]) == 0.0  # w~ = (.3, 1.5): error -50 on token 0, -0 elsewhere
    assert float(layer.bias[1]) == pytest.approx(0.0, abs=1e-6)  # w~ = (.3, 0): no error at all
    _, _, layer, ctx, step = _token_setup(w, batches, 0.1, robust=False)
    step.run(ctx)
    assert float(layer.bias[0]) == pytest.approx(50.0 / 8, rel=1e-4)  # the plain mean shift


@torch.no_grad()
def test_xi_check_keeps_xi_only_where_it_lowers_the_output_error() -> None:
    """Both channels lose an outlier weight 2.0 to clipping (grid 0.1, codes 0..15: 1.5), so
    Banner's xi > 1 on both. Channel 0's outlier meets an input that is active (100 on the first
    token): xi recovers part of it and stays. Channel 1's outlier meets an input that is always 0:
    clipping cost nothing, xi would only inflate the other weights - it is reset to 1."""
    w = torch.tensor([[0.3, 0.3, 2.0, 0.3], [0.3, 0.3, 0.3, 2.0]])
    x = torch.zeros(4, 8, 4)
    x[..., :2] = 1.0
    x[:, 0, 2] = 100.0
    _, _, layer, ctx, _ = _token_setup(w, [{"x": x, "attention_mask": torch.ones(4, 8)}], 0.1)
    plan = _plan(layer, BiasCorrectionOptions("both"))
    banner_xi, _ = banner_correction(layer.weight, layer.w_quant(layer.weight))
    assert (banner_xi > 1.3).all()
    kept = checked_xi(ctx, {"proj": plan})["proj"]
    assert float(kept[0]) == pytest.approx(float(banner_xi[0])) and float(kept[1]) == 1.0


def _tiny_ctx(tiny: nn.Module, data: torch.Tensor) -> Context:
    q = ptqkit.quantize(tiny, data, Recipe(w_bits=3, a_bits=3, first_last_8bit=False,
                                           w_range="minmax", a_range="aciq"))
    return Context(q, CalibrationData(data), Report())


@torch.no_grad()
def test_guard_never_raises_the_calibration_loss(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    for mode in ("both", "banner", "empirical"):
        ctx = _tiny_ctx(tiny, tiny_data)
        before = calibration_kl(ctx)
        summary = BiasCorrection(BiasCorrectionOptions(mode)).run(ctx)
        assert summary["kl_before"] == pytest.approx(before)
        assert calibration_kl(ctx) <= before + 1e-7
        assert summary["kept"] == (summary["kl_after"] <= summary["kl_before"])


@torch.no_grad()
def test_statistics_pass_caches_the_float_reference(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    """On a fresh context the float pass of the statistics also caches the float logits, which
    the guard then compares against: they are the float model's own outputs."""
    ctx = _tiny_ctx(tiny, tiny_data)
    assert ctx.cache.float_outputs is None
    summary = BiasCorrection(BiasCorrectionOptions("empirical", robust=False)).run(ctx)
    cached = torch.cat(ctx.cache.float_outputs)
    assert_close(cached, tiny(tiny_data), rtol=1e-5, atol=1e-6)
    fresh = _tiny_ctx(tiny, tiny_data)
    assert summary["kl_before"] == pytest.approx(calibration_kl(fresh), rel=1e-5)


@torch.no_grad()
def test_undo_restores_weights_scales_and_biases_bit_exactly(tiny: nn.Module,
                                                             tiny_data: torch.Tensor) -> None:
    ctx = _tiny_ctx(tiny, tiny_data)
    layers = ctx.layers()
    layers["fc"].bias = None  # a layer without bias: the step creates one, undo removes it
    state = {k: v.clone() for k, v in ctx.qmodel.state_dict().items()}
    out = ctx.qmodel(tiny_data)
    undo = _undo_handle(layers)
    BiasCorrection(BiasCorrectionOptions("both", guard=False)).run(ctx)
    assert layers["fc"].bias is not None
    undo()
    assert layers["fc"].bias is None
    after = ctx.qmodel.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(ctx.qmodel(tiny_data), out)


@torch.no_grad()
def test_sequential_mode_zeroes_the_mean_output_error_of_the_quantized_model(
        tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    """Each layer is corrected on its quantized inputs after the layers before it: the final
    logits of the quantized model then have the float model's mean, channel by channel."""
    ctx = _tiny_ctx(tiny, tiny_data)
    ref = torch.cat(ctx.float_outputs())
    before = (ctx.qmodel(tiny_data) - ref).mean(0).abs().max()
    summary = BiasCorrection(BiasCorrectionOptions("sequential", guard=False)).run(ctx)
    assert summary["mode"] == "sequential" and summary["layers"] == 3
    after = (ctx.qmodel(tiny_data) - ref).mean(0).abs().max()
    assert before > 1e-2 and after < 1e-5


class _SamePadConv(nn.Conv2d):
    """A Conv2d subclass that pads in its own forward (TF 'same' style), like EfficientNet's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


class _OffsetConv(nn.Conv2d):
    """A Conv2d subclass whose forward is not linear in its input (it squares it first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * x)


def _conv_ctx(seed: int = 0):  # type: ignore[no-untyped-def]
    """Strided, padded, grouped (depthwise), custom-forward and non-linear-forward convs and a
    Linear, quantized at 3-bit weights; three calibration batches of uneven size."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.ReLU(),
                        _SamePadConv(8, 6, 2, stride=2), _OffsetConv(6, 6, 1),
                        nn.Flatten(), nn.LazyLinear(5)).eval()
    batches = [torch.randn(n, 3, 12, 12, generator=g) + 0.5 for n in (7, 5, 4)]
    net(batches[0])
    q = ptqkit.quantize(net, batches, Recipe(w_bits=3, a_bits=8, first_last_8bit=False,
                                             w_range="minmax", a_range="minmax"))
    return q, Context(q, CalibrationData(batches), Report())


@torch.no_grad()
def test_batch_summed_mean_error_matches_the_per_sample_mean() -> None:
    """E[op(x, D)]_c from the batch-summed input equals the mean of the per-sample errors on
    every layer kind; the layer whose op is not linear in x is measured per sample."""
    q, ctx = _conv_ctx()
    layers = {n: m for n, m in quant_layers(q).items() if m.w_quant.active}
    plans = {n: _plan(m, BiasCorrectionOptions("empirical")) for n, m in layers.items()}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0]))
               for n, m in layers.items()]
    with quantizers_disabled(q):
        for b in ctx.calib.batches:
            q(b)
    for h in handles:
        h.remove()
    fast = mean_output_errors(ctx, plans)
    assert set(fast) == set(layers) and len(layers) == 5
    for n, m in layers.items():
        linear = isinstance(m, nn.Linear) or m.weight.dim() == 2
        rows = torch.cat([channel_rows(m.op(x, plans[n].delta, None), linear) for x in seen[n]])
        assert_close(fast[n], rows.double().mean(0).float(), rtol=1e-4, atol=1e-6)
    for n, linear_op in (("0", True), ("5", False)):  # "5" squares its input
        x = seen[n][0]
        full, summed = (channel_rows(layers[n].op(v, plans[n].delta, None), False).double().sum(0)
                        for v in (x, x.sum(0, keepdim=True)))
        assert _linear_in_x(full, summed) == linear_op


@torch.no_grad()
def test_summed_error_counts_only_real_tokens() -> None:
    """(N, T, C) token states with a mask: the batch-summed error sums over real tokens only."""
    x = torch.randn(2, 4, 2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    _, _, layer, _, _ = _token_setup(torch.tensor([[0.3, 0.3], [0.55, 0.7]]),
                                     [{"x": x, "attention_mask": mask}], 0.25)
    delta = torch.randn(2, 2)
    total, n = summed_error(layer, x, delta, True, mask)
    assert n == 6
    assert_close(total, nn.functional.linear(x[mask.bool()], delta).double().sum(0))


@torch.no_grad()
def test_guard_on_a_subset_uses_the_first_batches_holding_that_many_samples() -> None:
    """calibration_kl(ctx, k) is the loss on the first batches until k samples are covered;
    the step's guard_samples measures its guard there, and 0 is refused."""
    from ptqkit.calib.loss import calibration_loss

    q, ctx = _conv_ctx()  # batches of 7, 5 and 4 samples
    outs = [q(b) for b in ctx.calib.batches]
    ref = ctx.float_outputs()
    for k, n_batches in ((1, 1), (7, 1), (8, 2), (12, 2), (13, 3), (1000, 3)):
        assert calibration_kl(ctx, k) == pytest.approx(
            calibration_loss(ref[:n_batches], outs[:n_batches]))
    assert calibration_kl(ctx) == pytest.approx(calibration_loss(ref, outs))
    assert calibration_kl(ctx, 8) != pytest.approx(calibration_kl(ctx))
    summary = BiasCorrection(BiasCorrectionOptions("empirical", guard_samples=7)).run(ctx)
    assert summary["kl_before"] == pytest.approx(calibration_loss(ref[:1], outs[:1]))
    with pytest.raises(ValueError, match="guard_samples must be >= 1"):
        BiasCorrectionOptions("empirical", guard_samples=0)


class _CountingForward:
    """A CalibrationData forward that counts the batches it runs."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return model(batch)


@torch.no_grad()
def test_empirical_step_makes_no_float_pass_of_its_own(tiny: nn.Module,
                                                       tiny_data: torch.Tensor) -> None:
    """Without a cached reference the step's statistics pass provides it: one float pass plus
    the guard's two quantized passes, and the guard compares against the float model's logits."""
    ctx = _tiny_ctx(tiny, tiny_data)
    counter = _CountingForward()
    ctx.calib = CalibrationData(list(tiny_data.split(8)), forward_fn=counter)
    BiasCorrection(BiasCorrectionOptions("empirical", robust=False)).run(ctx)
    assert counter.calls == 3 * len(ctx.calib.batches)
    assert_close(torch.cat(ctx.cache.float_outputs), tiny(tiny_data), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_range_pass_keeps_the_float_reference_only_for_later_steps(
        tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    """The ranges step's statistics pass caches the float logits when the recipe has later
    steps and the weights are the float snapshot; a changed weight stops it."""
    from ptqkit.algorithms.range_init import RangeInit, RangeOptions

    def fresh(steps: list[dict[str, object]]) -> Context:
        ctx = _tiny_ctx(tiny, tiny_data)
        ctx.recipe = Recipe.from_dict({"steps": steps})
        ctx.snapshot_float()
        return ctx

    ctx = fresh([{"name": "bias_correction"}])
    RangeInit(RangeOptions()).run(ctx)
    assert_close(torch.cat(ctx.cache.float_outputs), tiny(tiny_data), rtol=1e-5, atol=1e-6)
    ctx = fresh([])
    RangeInit(RangeOptions()).run(ctx)
    assert ctx.cache.float_outputs is None
    ctx = fresh([{"name": "bias_correction"}])
    next(iter(quant_layers(ctx.qmodel).values())).weight.mul_(1.5)
    assert not ctx.wants_float_outputs()
    RangeInit(RangeOptions()).run(ctx)
    assert ctx.cache.float_outputs is None
