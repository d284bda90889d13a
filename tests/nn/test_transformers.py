"""Hugging Face encoders through prepare/quantize, on a tiny random BERT built here (no download)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from ptqkit import Recipe, quantize
from ptqkit.calib.data import CalibrationData
from ptqkit.nn.control import quantizers_disabled
from ptqkit.nn.modules import QuantEmbedding, QuantLinear, quant_layers
from ptqkit.pipeline import LowCoverageWarning, StepSpec

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(pooler: bool = True, attn: str = "sdpa") -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=pooler).eval()


def batches(n: int = 4, size: int = 8, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """Token batches with right padding (attention_mask 0 on the padded tail)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 50, (size, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (size,), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _embedding(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def test_every_linear_is_quantized_and_the_rest_stays_float() -> None:
    model = tiny_bert()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no BatchNorm warning (and no fx trace) for a BN-free model
        warnings.simplefilter("ignore", LowCoverageWarning)  # attention matmuls stay float
        q = quantize(model, batches(), Recipe(w_bits=4, a_bits=4))
    layers = quant_layers(q)
    assert n_linear == 13 and len(layers) == 13
    assert all(isinstance(m, QuantLinear) for m in layers.values())
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert sum(isinstance(m, nn.LayerNorm) for m in q.modules()) == 5
    assert isinstance(q.embeddings.word_embeddings, nn.Embedding)
    # execution order; first and last (the pooler here) stay 8-bit
    names = list(layers)
    assert names[0] == "encoder.layer.0.attention.self.query" and names[-1] == "pooler.dense"
    assert [(layers[n].w_bits, layers[n].a_bits) for n in (names[0], names[1], names[-1])] == [
        (8, 8), (4, 4), (8, 8)]
    floats = q.report.stays_float
    assert any(s.startswith("activation x activation matmuls") and "scaled_dot_product" in s
               for s in floats)
    assert any("LayerNorm" in s for s in floats) and any("Embedding" in s for s in floats)
    assert q.ptq.bn_unfolded_reason is None and q.ptq.folded == {}
    cov = q.report.coverage
    assert 0 < cov["fraction"] < 1 and cov["float_layers"][0]["name"].startswith("activation x")


def test_eager_attention_matmuls_are_reported() -> None:
    q = quantize(tiny_bert(attn="eager"), batches(1), Recipe())
    line = next(s for s in q.report.stays_float if s.startswith("activation x activation"))
    assert "matmul x4" in line  # 2 layers x (QK^T, PV)


def test_w8a8_embeddings_stay_close_and_attention_mask_is_used() -> None:
    model, data = tiny_bert(pooler=False), batches()
    q = quantize(model, data, Recipe(w_bits=8, a_bits=8))
    with torch.no_grad():
        for b in data:
            cos = F.cosine_similarity(_embedding(q, b), _embedding(model, b), dim=-1)
            assert float(cos.min()) > 0.999
            # the default forward feeds the mask: same as the float model with the mask
            calib = CalibrationData([b])
            with quantizers_disabled(q):
                assert_close(calib.forward(q, b), model(**b).last_hidden_state, rtol=1e-5, atol=1e-5)
            no_mask = model(input_ids=b["input_ids"]).last_hidden_state
            assert not torch.allclose(no_mask, model(**b).last_hidden_state, atol=1e-3)


def test_tokenizer_batch_encoding_is_a_valid_batch() -> None:
    model = tiny_bert(pooler=False)
    enc = [transformers.BatchEncoding(b) for b in batches(2)]
    q = quantize(model, enc, Recipe(calib_size=10))
    assert q.report.layers and CalibrationData(enc, limit=10).num_samples == 10


def test_w4a8_degrades_less_than_w2a8() -> None:
    model, data = tiny_bert(pooler=False), batches()

    def mean_cos(recipe: Recipe) -> float:
        q = quantize(model, data, recipe)
        with torch.no_grad():
            return float(torch.cat([F.cosine_similarity(_embedding(q, b), _embedding(model, b), -1)
                                    for b in data]).mean())

    c4, c2 = mean_cos(Recipe(w_bits=4, a_bits=8)), mean_cos(Recipe(w_bits=2, a_bits=8))
    assert 1.0 > c4 > c2


def test_embedding_step_is_weight_only_per_row() -> None:
    model, data = tiny_bert(pooler=False), batches(2)
    q = quantize(model, data, Recipe().with_steps(StepSpec("embeddings", {"bits": 4})))
    emb = q.embeddings.word_embeddings
    assert isinstance(emb, QuantEmbedding) and isinstance(q.embeddings.position_embeddings,
                                                          QuantEmbedding)
    assert "embeddings.word_embeddings" not in quant_layers(q)  # no input quantizer to calibrate
    assert not any(s.startswith("embeddings.word_embeddings") for s in q.report.stays_float)
    assert any(n.startswith("embeddings: 4-bit weight-only") for n in q.report.notes)
    w = model.embeddings.word_embeddings.weight
    ids = torch.arange(50)
    scale, _ = emb.w_quant.qparams()
    with torch.no_grad():
        err = (emb(ids) - w).abs()
        assert emb.w_quant.scale.numel() == 50
        assert bool((err <= scale[:, None] / 2 + 1e-6).all())  # min-max per row: half a step
        assert len(torch.unique(emb(ids)[7])) <= 16
        with quantizers_disabled(q):
            assert torch.equal(emb(ids), w)


def test_embedding_step_options_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown range method"):
        StepSpec("embeddings", {"range": "nope"})
    with pytest.raises(ValueError, match="unknown option"):
        StepSpec("embeddings", {"bit": 8})
    q = quantize(tiny_bert(pooler=False), batches(1),
                 Recipe().with_steps(StepSpec("embeddings", {"include": "*word*"})))
    assert isinstance(q.embeddings.word_embeddings, QuantEmbedding)
    assert type(q.embeddings.position_embeddings) is nn.Embedding
