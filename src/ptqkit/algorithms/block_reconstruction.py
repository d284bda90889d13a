"""Block reconstruction (BRECQ, Li et al. 2021) with QDrop (Wei et al. 2022).

The network is cut into blocks: subgraphs with a single input and a single output tensor,
found on the ``torch.fx`` graph in which every quantized layer is one node. A position of the
graph's topological order where exactly one computed value is still needed later is a *cut*;
the nodes between two cuts form an atomic span (a residual unit is one span, because its skip
branch is live inside it; a plain chain of layers gives one span per layer). Consecutive spans
of single layers are merged while they lie in the same parent module (one unit of the model's
code, e.g. an inverted-residual block without its skip) and the block holds at most
``max_layers`` layers; a residual unit stays one block, and the first and the last quantized
layer are blocks of their own. A model that cannot be traced falls back to one block
per layer.

For each block in execution order, with ``X'`` the block input produced by the quantized
prefix and ``Y`` the float model's block output, minimise

    L = mean_n || f_q(X'_n) - Y_n ||_2^2  +  lambda * sum_w (1 - |2 h(V_w) - 1|^beta)

where the squared norm is summed over channels and averaged over samples and positions (BRECQ's
reconstruction loss with p = 2), f_q is the block with quantized weights and activations, and
the second term is AdaRound's rounding regulariser (Nagel et al. 2020). The learned quantities:

* weight rounding: every weight is quantized as ``q = clamp(floor(W / s0) + h(V) + z, qmin,
  qmax)``, ``h(V) = clamp(1.2 sigmoid(V) - 0.1, 0, 1)``, V initialised so that h(V) equals the
  fractional part of W / s0 (the float weight). ``rounding="nearest"`` keeps round-to-nearest
  codes and learns only the step sizes;
* weight step sizes: ``s_w = s0 exp(u_w)`` per output channel, the integer codes fixed;
* activation step sizes (LSQ): ``s_a = s_a0 exp(u_a)`` per layer input.

beta is annealed from ``beta_start`` to ``beta_end`` after a warm-up of ``warmup`` of the
iterations, during which lambda is 0. With QDrop (``drop_prob`` > 0) each element of every
activation inside the block is left float with probability ``drop_prob`` and quantized
otherwise, during reconstruction only (``drop_prob`` = 0 is BRECQ: everything quantized).
At the end the rounding is made hard (h = 1[V >= 0]), and the block is kept only when its
reconstruction MSE on the calibration data is not above the round-to-nearest start's; otherwise
the start is restored.

Block inputs and outputs are cached once per block (one segment pass per batch, in an
:class:`~ptqkit.calib.cache.ActivationCache`; together they spill to disk above
``memory_budget_mb``);
nothing restarts a forward pass.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..calib.cache import ActivationCache
from ..calib.data import default_forward
from ..calib.engine import LeafTracer, run_nodes
from ..core.primitives import EPS, fake_quantize
from ..nn.modules import QuantModule
from .adaquant import capture_layer_input
from .base import Context, Step, register_step

__all__ = ["BlockReconstructionOptions", "Block", "find_blocks", "reconstruct_block",
           "BlockReconstruction"]

log = logging.getLogger(__name__)
ROUNDINGS = ("adaround", "nearest")
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid: h = clamp(sigmoid(V) (zeta - gamma) + gamma)


@dataclass(frozen=True)
class BlockReconstructionOptions:
    """Options of the "block_reconstruction" step (see the module docstring for the equations).

    iters / batch_size: Adam steps per block and samples per step.
    max_layers: most quantized layers in one block.
    rounding: "adaround" (learned rounding) or "nearest" (round-to-nearest codes, step sizes only).
    lr_round: Adam learning rate of V; lr_w_scale / lr_a_scale: of log step sizes (relative
    change per step) of the weight / activation quantizers (0 freezes them).
    reg_weight: lambda of the rounding regulariser; beta_start / beta_end / warmup: its annealing.
    drop_prob: QDrop's probability that an activation element is left float during reconstruction
    (0: every element quantized, as in BRECQ).
    memory_budget_mb: in-memory budget of the block caches together. At most ``LIVE_CACHES``
    are alive at once (quantized-prefix inputs, float inputs, the block's float outputs, the
    next block's inputs), each holding up to 1/LIVE_CACHES of it in memory; the rest spills
    to ``spill_dir``.
    check_samples: calibration samples on which the end result is compared with the start.
    """

    iters: int = 500
    batch_size: int = 32
    max_layers: int = 4
    rounding: str = "adaround"
    lr_round: float = 1e-2
    lr_w_scale: float = 1e-4
    lr_a_scale: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    memory_budget_mb: float = 2048.0
    spill_dir: str | None = None
    check_samples: int = 256

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        for key in ("iters", "check_samples"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("batch_size", "max_layers"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr_round", "lr_w_scale", "lr_a_scale", "reg_weight", "memory_budget_mb"):
            if float(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= float(self.drop_prob) <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        if not 0.0 <= float(self.warmup) < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not self.beta_start >= self.beta_end > 0:
            raise ValueError(f"need beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}")


# ----------------------------------------------------------------------------- blocks
@dataclass
class Block:
    """Quantized layers ``layers`` (in order) between graph positions ``start`` and ``stop``:
    ``nodes[start:stop]`` computes ``out_node`` from the tensor ``in_node`` and the non-tensor
    values live at ``start`` (``extras_in``, e.g. a batch size read from the input; positions in
    the graph). Without a graph (``start`` = -1) the block is the single layer ``layers[0]``
    applied to its input."""

    layers: list[str]
    start: int = -1
    stop: int = -1
    in_node: fx.Node | None = None
    out_node: fx.Node | None = None
    extras_in: list[int] = field(default_factory=list)
    extras_out: list[int] = field(default_factory=list)
    uses_extras: bool = False
    spans: int = 1  # atomic spans merged into the block


class _Graph:
    """A traced model with the bookkeeping of :func:`~ptqkit.calib.engine.run_nodes`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gm = fx.GraphModule(model, LeafTracer().trace(model))
        self.nodes = list(self.gm.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((index[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)}
        self.layer_pos = {str(n.target): i for i, n in enumerate(self.nodes) if n.op == "call_module"
                          and isinstance(model.get_submodule(str(n.target)), QuantModule)}

    def run(self, block: Block, x: torch.Tensor, extras: dict[int, Any]
            ) -> tuple[torch.Tensor, dict[int, Any]]:
        """The block's output for input ``x`` and the non-tensor values live at its end, from
        those live at its start (``extras``: graph position -> value)."""
        assert block.in_node is not None and block.out_node is not None
        # positions map the block's nodes onto this graph (another trace of the same model)
        env: dict[Any, Any] = {self.nodes[_pos(block.in_node)]: x}
        env.update({self.nodes[i]: extras[i] for i in block.extras_in})
        run_nodes(self.gm, self.nodes, self.last_use, block.start, block.stop, env)
        return env[self.nodes[_pos(block.out_node)]], {i: env[self.nodes[i]] for i in block.extras_out}


def _pos(node: fx.Node) -> int:
    return int(node.meta["ptq_pos"])


def _tensor_nodes(graph: _Graph, sample: torch.Tensor) -> set[fx.Node]:
    """Nodes whose value is a tensor, found by running one sample through the graph."""
    interp = fx.Interpreter(graph.gm)
    tensors = set()
    with torch.no_grad():
        for node in graph.nodes:
            interp.env[node] = sample if node.op == "placeholder" else interp.run_node(node)
            if isinstance(interp.env[node], torch.Tensor):
                tensors.add(node)
    return tensors


def _cuts(graph: _Graph, tensors: set[fx.Node]) -> list[tuple[int, fx.Node, list[int]]]:
    """Positions p where exactly one live value is a tensor: (p, that node, positions of the
    live non-tensor values)."""
    out = []
    for p in range(1, len(graph.nodes)):
        live = [n for n in graph.nodes[:p] if graph.last_use[n] >= p]
        live_t = [n for n in live if n in tensors]
        if len(live_t) == 1 and live_t[0].op != "placeholder":
            out.append((p, live_t[0], [_pos(n) for n in live if n not in tensors]))
    return out


def find_blocks(model: nn.Module, sample: torch.Tensor, layers: list[str], max_layers: int
                ) -> tuple[list[Block], _Graph | None]:
    """Partition ``layers`` (quantized layers of ``model``) into blocks (module docstring).

    sample: one model input (batch of 1 is enough), used to tell tensors from other values.
    Returns the blocks in execution order and the traced graph, or one block per layer and None
    when the model cannot be traced or a layer is not one node of the graph."""
    try:
        graph = _Graph(model)
    except Exception as exc:  # fx raises many types; any failure means: layer blocks
        log.info("block reconstruction: the model cannot be traced (%s); one block per layer",
                 str(exc).split("\n")[0])
        return [Block([name]) for name in layers], None
    wanted = set(layers)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or not wanted <= set(graph.layer_pos) or sum(
            n.op == "call_module" and str(n.target) in wanted for n in graph.nodes) != len(wanted):
        log.info("block reconstruction: several inputs or layers called twice; one block per layer")
        return [Block([name]) for name in layers], None
    for i, n in enumerate(graph.nodes):
        n.meta["ptq_pos"] = i
    cuts = _cuts(graph, _tensor_nodes(graph, sample))
    order = sorted(wanted, key=graph.layer_pos.__getitem__)
    first, last = order[0], order[-1]
    bounds: list[tuple[int, fx.Node, list[int]]] = [(0, placeholders[0], [])] + cuts
    spans: list[Block] = []
    lead: tuple[int, fx.Node, list[int]] | None = None  # leading layer-free nodes join the first span
    for (a, a_node, a_extra), (b, b_node, b_extra) in zip(bounds, bounds[1:]):
        inside = [n for n in order if a <= graph.layer_pos[n] < b]
        if inside:
            (a, a_node, a_extra), lead = lead or (a, a_node, a_extra), None
            spans.append(Block(inside, a, b, a_node, b_node, a_extra, b_extra))
        elif spans:  # no layer: the nodes join the previous span
            spans[-1].stop, spans[-1].out_node, spans[-1].extras_out = b, b_node, b_extra
        elif lead is None:
            lead = (a, a_node, a_extra)
    tail = [n for n in order if graph.layer_pos[n] >= bounds[-1][0]]
    if tail:  # layers after the last cut: the rest of the graph is not one tensor -> layer blocks
        log.info("block reconstruction: %d layers after the last single-tensor cut are fitted as "
                 "layers", len(tail))
    blocks: list[Block] = []
    for span in spans:
        prev = blocks[-1] if blocks else None
        if prev is not None and _joins(prev, span, {first, last}, max_layers):
            prev.layers += span.layers
            prev.stop, prev.out_node, prev.extras_out = span.stop, span.out_node, span.extras_out
            prev.spans += 1
        else:
            blocks.append(span)
    for blk in blocks:
        extra = {graph.nodes[i] for i in blk.extras_in}
        blk.uses_extras = any(a in extra for n in graph.nodes[blk.start:blk.stop] for a in n.all_input_nodes)
    return blocks + [Block([name]) for name in tail], graph


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _joins(prev: Block, span: Block, alone: set[str], max_layers: int) -> bool:
    """Whether ``span`` (a single layer) extends block ``prev``: neither holds the first or last
    layer, ``prev`` is not a multi-layer span (a residual unit), both lie in the same parent
    module (one unit of the model's own code) and the result has at most ``max_layers``."""
    layers = prev.layers + span.layers
    return (len(span.layers) == 1 and len(layers) <= max_layers and not alone & set(layers)
            and len({_parent(n) for n in layers}) == 1 and prev.spans == len(prev.layers))


# ----------------------------------------------------------------------------- the learned block
class _LayerParams:
    """One layer's learned quantities: rounding V, log weight steps u_w, log input step u_a."""

    def __init__(self, layer: QuantModule, rounding: str) -> None:
        self.layer = layer
        wq, aq = layer.w_quant, layer.a_quant
        self.s0 = wq.scale.detach().clamp(min=EPS).clone()
        self.z = torch.round(wq.zero_point.detach()).clone()
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        ratio = layer.weight.detach() / self.s0.reshape(shape)
        self.floor = torch.floor(ratio)
        self.shape = shape
        rest = (ratio - self.floor).clamp(0.0, 1.0)
        self.learn_round = rounding == "adaround" and wq.active
        if self.learn_round:
            p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
            self.v = torch.log(p / (1 - p)).requires_grad_(True)
        else:
            self.v = (rest >= 0.5).float() * 2 - 1  # sign of V: the nearest code
        self.u_w = torch.zeros_like(self.s0, requires_grad=True)
        self.sa0 = aq.scale.detach().clamp(min=EPS).clone()
        self.za = aq.zero_point.detach().clone()
        self.u_a = torch.zeros_like(self.sa0, requires_grad=True)
        self.w_saved = layer.weight.detach().clone()
        self.state = {k: t.detach().clone() for k, t in (("ws", wq.scale), ("wz", wq.zero_point),
                                                          ("as", aq.scale), ("az", aq.zero_point))}

    def h(self, hard: bool) -> torch.Tensor:
        if not self.learn_round or hard:
            return (self.v >= 0).float()
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def weight(self, hard: bool) -> torch.Tensor:
        spec = self.layer.w_quant.spec
        if not self.layer.w_quant.active:
            return self.layer.weight
        lo, hi = self.layer.w_quant.code_bounds() or (spec.qmin, spec.qmax)
        if isinstance(lo, torch.Tensor):
            lo, hi = lo.reshape(self.shape), hi.reshape(self.shape)  # type: ignore[union-attr]
        z = self.z.reshape(self.shape)
        q = torch.clamp(self.floor + self.h(hard) + z, lo, hi)  # type: ignore[arg-type]
        return (q - z) * (self.s0 * torch.exp(self.u_w)).reshape(self.shape)

    def reg(self, beta: float) -> torch.Tensor:
        if not self.learn_round:
            return torch.zeros(())
        return (1 - (2 * self.h(False) - 1).abs().pow(beta)).sum()

    def forward_fn(self, state: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        layer, aq = self.layer, self.layer.a_quant

        def forward(x: torch.Tensor) -> torch.Tensor:
            if aq.active:
                lo, hi = aq.spec.qmin, aq.spec.qmax
                xq = fake_quantize(x, (self.sa0 * torch.exp(self.u_a)).clamp(min=EPS),
                                   self.za.clamp(lo, hi), aq.spec)
                p = state["drop_prob"]
                x = xq if p <= 0.0 else torch.where(torch.rand_like(x) < p, x, xq)
            return layer.op(x, self.weight(state["hard"]), layer.bias)

        return forward

    def params(self, opts: BlockReconstructionOptions) -> list[dict[str, Any]]:
        groups = [{"params": [self.u_w], "lr": opts.lr_w_scale},
                  {"params": [self.u_a], "lr": opts.lr_a_scale}]
        return ([{"params": [self.v], "lr": opts.lr_round}] if self.learn_round else []) + groups

    @torch.no_grad()
    def write(self) -> None:
        """The hard-rounded result into the layer: weights on the grid, learned step sizes."""
        layer = self.layer
        if layer.w_quant.active:
            layer.weight.copy_(self.weight(hard=True))
            layer.w_quant.scale.copy_(self.s0 * torch.exp(self.u_w))
        if layer.a_quant.active:
            layer.a_quant.scale.copy_(self.sa0 * torch.exp(self.u_a))

    @torch.no_grad()
    def restore(self) -> None:
        layer = self.layer
        layer.weight.copy_(self.w_saved)
        for (q, key) in ((layer.w_quant, "w"), (layer.a_quant, "a")):
            q.scale.copy_(self.state[key + "s"])
            q.zero_point.copy_(self.state[key + "z"])


@contextmanager
def _patched(params: list[_LayerParams], state: dict[str, Any]) -> Iterator[None]:
    """Route each layer's forward through its learned quantities while the block is fitted."""
    with ExitStack() as stack:
        for p in params:
            p.layer.forward = p.forward_fn(state)  # type: ignore[method-assign, assignment]
            stack.callback(p.layer.__dict__.pop, "forward", None)
        yield


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over samples and positions."""
    err = (out - target).pow(2)
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


Run = Callable[[torch.Tensor, int], torch.Tensor]  # (block input, calibration batch) -> output


def _draw(xs: ActivationCache, ys: ActivationCache, batch: int, whole: bool, gen: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A random cached batch i, cut to ``batch`` random samples unless ``whole``."""
    i = int(torch.randint(len(xs), (1,), generator=gen))
    (x,), (y,) = xs[i], ys[i]
    if x.shape[0] > batch and not whole:
        idx = torch.randperm(x.shape[0], generator=gen)[:batch]
        x, y = x[idx], y[idx]
    return x, y, i


@torch.no_grad()
def _check_mse(run: Run, xs: ActivationCache, ys: ActivationCache, samples: int) -> float:
    total, count = 0.0, 0
    for i, ((x,), (y,)) in enumerate(zip(xs, ys)):
        total += float(_rec_loss(run(x, i), y)) * x.shape[0]
        count += x.shape[0]
        if count >= samples:
            break
    return total / max(count, 1)


def reconstruct_block(layers: list[QuantModule], run: Run, xs: ActivationCache, ys: ActivationCache,
                      opts: BlockReconstructionOptions, gen: torch.Generator,
                      whole_batches: bool = False) -> dict[str, Any]:
    """Fit one block in place (module docstring): ``run(x, i)`` computes the block's output from
    its input ``x`` (a part of calibration batch ``i``) with the model's layers; ``xs`` / ``ys``
    hold one (N, ...) block input from the quantized prefix / float block output per calibration
    batch. ``whole_batches``: draw whole cached batches (the block reads values such as the batch
    size). The layers end hard-rounded with the learned step sizes, or unchanged when that did
    not lower the check MSE."""
    params = [_LayerParams(lay, opts.rounding) for lay in layers]
    state: dict[str, Any] = {"hard": True, "drop_prob": 0.0}
    with _patched(params, state):
        before = _check_mse(run, xs, ys, opts.check_samples)
        groups = [g for p in params for g in p.params(opts) if g["lr"] > 0]
        warm = int(opts.warmup * opts.iters)
        state.update(hard=False, drop_prob=opts.drop_prob)
        with torch.enable_grad():
            opt = torch.optim.Adam(groups) if groups else None
            for it in range(opts.iters if opt is not None else 0):
                x, y, i = _draw(xs, ys, opts.batch_size, whole_batches, gen)
                loss = _rec_loss(run(x, i), y)
                if it >= warm and opts.reg_weight > 0:
                    frac = (it - warm) / max(opts.iters - warm, 1)
                    beta = opts.beta_start + (opts.beta_end - opts.beta_start) * frac  # linear
                    loss = loss + opts.reg_weight * sum((p.reg(beta) for p in params), torch.zeros(()))
                opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                loss.backward()
                opt.step()  # type: ignore[union-attr]
        state.update(hard=True, drop_prob=0.0)
        after = _check_mse(run, xs, ys, opts.check_samples)
    kept = after <= before
    for p in params:
        p.write() if kept else p.restore()
    soft = [float(((h > 0.01) & (h < 0.99)).float().mean())
            for h in (p.h(False) for p in params if p.learn_round)]
    return {"mse_before": before, "mse_after": after if kept else before, "kept": kept,
            "soft_share": max(soft, default=0.0)}


# ----------------------------------------------------------------------------- the step
LIVE_CACHES = 4  # caches a _Walk holds at once: xq, xf and ys, plus the new inputs in advance()


class _Walk:
    """Block inputs of the quantized and float models, one block after the other."""

    def __init__(self, ctx: Context, ref: nn.Module, graph: _Graph | None,
                 opts: BlockReconstructionOptions) -> None:
        self.ctx, self.ref, self.opts = ctx, ref, opts
        self.qgraph, self.rgraph = graph, _Graph(ref) if graph is not None else None
        if self.rgraph is not None:
            assert self.qgraph is not None and len(self.rgraph.nodes) == len(self.qgraph.nodes)
        self.xq = self._cache()
        self.xf = self._cache()
        self.at = 0  # graph position of the cached inputs
        self.extras: list[dict[int, Any]] = []  # per batch: the live non-tensor values
        for batch in ctx.calib:
            x = batch if isinstance(batch, torch.Tensor) else batch[0]
            self.xq.append(x)
            self.xf.append(x)
            self.extras.append({})

    def _cache(self) -> ActivationCache:
        share = self.opts.memory_budget_mb * (1 << 20) / LIVE_CACHES
        return ActivationCache(int(share), self.opts.spill_dir)

    def inputs(self, block: Block) -> tuple[ActivationCache, ActivationCache, Run]:
        """(quantized-prefix inputs, float targets, run) of ``block``."""
        ys = self._cache()
        if block.in_node is None:  # a layer block: inputs by capture, targets by the float layer
            name = block.layers[0]
            ref_layer = self.ref.get_submodule(name)
            q_layer = self.ctx.qmodel.get_submodule(name)
            assert isinstance(ref_layer, QuantModule) and isinstance(q_layer, QuantModule)
            xs = self._cache()
            with torch.no_grad():
                for batch in self.ctx.calib:
                    xs.append(capture_layer_input(self.ctx.qmodel, q_layer, self.ctx.calib, batch))
                    xr = capture_layer_input(self.ref, ref_layer, self.ctx.calib, batch)
                    ys.append(ref_layer.op(xr, ref_layer.weight, ref_layer.bias))
            return xs, ys, lambda x, i: q_layer(x)
        assert self.rgraph is not None and self.qgraph is not None
        if block.start != self.at:
            raise RuntimeError(f"block starts at {block.start}, the cached inputs are at {self.at}")
        with torch.no_grad():
            for (x,), extra in zip(self.xf, self.extras):
                ys.append(self.rgraph.run(block, x, extra)[0])
        qgraph, extras = self.qgraph, self.extras
        return self.xq, ys, lambda x, i: qgraph.run(block, x, extras[i])[0]

    def advance(self, block: Block, ys: ActivationCache) -> None:
        """Move the cached inputs past ``block`` (its float outputs become the float inputs)."""
        if block.in_node is None:
            ys.close()
            return
        assert self.qgraph is not None
        new, extras = self._cache(), []
        with torch.no_grad():
            for (x,), extra in zip(self.xq, self.extras):
                out, after = self.qgraph.run(block, x, extra)
                new.append(out)
                extras.append(after)
        self.extras = extras
        self.xq.close()
        self.xf.close()
        self.xq, self.xf, self.at = new, ys, block.stop

    def close(self) -> None:
        self.xq.close()
        self.xf.close()


@register_step
class BlockReconstruction(Step[BlockReconstructionOptions]):
    """Reconstructs the network block by block in execution order (module docstring)."""

    name = "block_reconstruction"
    Options = BlockReconstructionOptions
    effects = frozenset({"tunes_ranges", "changes_weights"})

    def run(self, ctx: Context) -> dict[str, Any]:
        opts: BlockReconstructionOptions = self.options
        ctx.float_outputs()  # later steps compare against the float logits of unchanged weights
        layers = [n for n, m in ctx.layers().items() if m.w_quant.active or m.a_quant.active]
        if not layers:
            return {"blocks": 0, "layers": 0}
        custom = ctx.calib.forward_fn is not default_forward or isinstance(ctx.calib.batches[0], dict)
        sample = ctx.calib.batches[0]
        blocks, graph = ([Block([n]) for n in layers], None) if custom else \
            find_blocks(ctx.qmodel, (sample if isinstance(sample, torch.Tensor) else sample[0])[:1],
                        layers, opts.max_layers)
        gen = torch.Generator().manual_seed(ctx.seed)
        with ctx.as_float():
            ref = copy.deepcopy(ctx.qmodel)  # quantizers stay off in the copy
        modules = ctx.layers()
        done: list[dict[str, Any]] = []
        t_start = time.perf_counter()
        walk = _Walk(ctx, ref, graph, opts)
        try:
            for block in tqdm(blocks, desc="block reconstruction", disable=None):
                t0 = time.perf_counter()
                xs, ys, run = walk.inputs(block)
                stats = reconstruct_block([modules[n] for n in block.layers], run, xs, ys, opts, gen,
                                          block.uses_extras)
                if block.in_node is None:
                    xs.close()
                walk.advance(block, ys)
                stats.update(layers=block.layers, seconds=time.perf_counter() - t0)
                for n in block.layers:
                    ctx.report.layer(n)["block_reconstruction"] = {k: v for k, v in stats.items()
                                                                   if k != "layers"}
                log.info("block %s: mse %.4g -> %.4g (%s, %.1fs)", "+".join(block.layers),
                         stats["mse_before"], stats["mse_after"], "kept" if stats["kept"] else "undone",
                         stats["seconds"])
                done.append(stats)
        except KeyboardInterrupt:
            msg = (f"block reconstruction interrupted after {len(done)} of {len(blocks)} blocks; the "
                   "model passed to quantize() is untouched (ptqkit works on a copy)")
            log.warning(msg)
            raise KeyboardInterrupt(msg) from None
        finally:
            walk.close()
        return {"blocks": len(done), "layers": sum(len(s["layers"]) for s in done),
                "graph_blocks": graph is not None, "iters": opts.iters, "drop_prob": opts.drop_prob,
                "rounding": opts.rounding, "kept": sum(s["kept"] for s in done),
                "mse_before_sum": sum(s["mse_before"] for s in done),
                "mse_after_sum": sum(s["mse_after"] for s in done),
                "block_sizes": [len(s["layers"]) for s in done],
                "seconds": time.perf_counter() - t_start}

