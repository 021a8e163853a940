"""Hashed n-gram features of many texts at once, in NumPy (no per-token Python loop).

Tokenization is the reference DSIR's (the ``data-selection`` package): lower-case, then NLTK's
``WordPunctTokenizer``, i.e. the regular expression ``\\w+|[^\\w\\s]+`` — runs of word characters and runs
of punctuation, split at whitespace (with Unicode's ``\\w`` and ``\\s``, as NLTK's ``regex`` engine has them).
Here it is done on the code points of a whole batch of texts: every character is classed (whitespace /
word / other) through a table built once from ``unicodedata``, tokens are the maximal runs of one class,
and each token's hash is a polynomial hash read off a prefix sum of the code points (one ``cumsum`` over
the batch), finished with MurmurHash3's 32-bit mixer. A bigram's hash mixes its two token hashes;
n-grams never cross a document boundary. Buckets are ``hash % buckets``.

The hash differs from the reference's (SHA-256 of each n-gram string, one Python call per n-gram), so
the two put n-grams into different buckets: the features are the same n-gram counts up to which
n-grams share a bucket. Hashes are fixed (no per-process salt): the same text gives the same buckets
on every machine, process and run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from whatmatters.core.fractions import whole

WHITESPACE, WORD, OTHER = 0, 1, 2
_BASE = 0x01000193  # FNV prime (odd, so invertible modulo 2**32)
_NGRAM_MUL = np.uint32(0x9E3779B1)  # golden-ratio constant for combining token hashes
_NGRAM_ADD = (np.uint32(0x7F4A7C15), np.uint32(0x2545F491), np.uint32(0x6C8E9CF5), np.uint32(0xB5297A4D))


_MARKS = ("Mn", "Mc", "Me", "Pc")  # combining marks and connector punctuation: inside words
_JOINERS = (0x200C, 0x200D)  # zero-width (non-)joiners
_CIRCLED_LETTERS = range(0x24B6, 0x24EA)  # symbols with the Unicode Alphabetic property


def _class_of(char: str) -> int:
    """Unicode's ``\\w`` / ``\\s`` (the ``regex`` engine's, which NLTK's tokenizers use), from ``unicodedata``.

    Word: Python's ``\\w`` plus combining marks, connector punctuation and joiners, less the "other numbers"
    (superscripts, fractions); whitespace: Python's ``\\s`` less the ASCII separators 0x1C-0x1F.
    """
    import unicodedata

    point = ord(char)
    if char.isspace():
        return OTHER if 0x1C <= point <= 0x1F else WHITESPACE
    category = unicodedata.category(char)
    if category == "No":
        return OTHER
    if re.match(r"\w", char) or category in _MARKS or point in _JOINERS or point in _CIRCLED_LETTERS:
        return WORD
    return OTHER


@lru_cache(maxsize=1)
def _class_table() -> np.ndarray:
    """Class of every code point of the Basic Multilingual Plane: ``_class_of`` for all of them at once."""
    import unicodedata

    chars = "".join(map(chr, range(0x10000)))
    categories = np.array(list(map(unicodedata.category, chars)))
    word = np.zeros(0x10000, bool)
    word[[m.start() for m in re.finditer(r"\w", chars)]] = True
    word |= np.isin(categories, _MARKS)
    word[list(_JOINERS)] = True
    word[_CIRCLED_LETTERS.start : _CIRCLED_LETTERS.stop] = True
    word &= categories != "No"
    space = np.fromiter(map(str.isspace, chars), bool, count=0x10000)
    space[0x1C:0x20] = False
    table = np.full(0x10000, OTHER, np.uint8)
    table[word] = WORD
    table[space] = WHITESPACE
    return table


def _classify(points: np.ndarray) -> np.ndarray:
    table = _class_table()
    if points.dtype == np.uint8:
        return table[:256][points]
    classes = np.take(table, points, mode="clip")
    high = points > 0xFFFF
    if high.any():  # beyond the BMP (emoji, historic scripts): once per distinct character
        values, inverse = np.unique(points[high], return_inverse=True)
        lookup = np.array([_class_of(chr(int(v))) for v in values], dtype=np.uint8)
        classes[high] = lookup[inverse]
    return classes


class _Powers:
    """base**i and base**-i modulo 2**32 for i < n, grown on demand (one per process)."""

    def __init__(self, base: int = _BASE) -> None:
        self.base, self.base_inv = base, pow(base, -1, 1 << 32)
        self.pw = np.ones(0, np.uint32)
        self.inv = np.ones(0, np.uint32)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pw) < n:
            m = max(n, 2 * len(self.pw), 1 << 16)
            self.pw = np.full(m, self.base, np.uint32)
            self.pw[0] = 1
            np.cumprod(self.pw, out=self.pw, dtype=np.uint32)
            self.inv = np.full(m, self.base_inv, np.uint32)
            self.inv[0] = 1
            np.cumprod(self.inv, out=self.inv, dtype=np.uint32)
        return self.pw[:n], self.inv[:n]


_POWERS = _Powers()
_POWERS2 = _Powers(0x5BD1E995)  # a second base (MurmurHash2's): 64-bit keys of the distinct n-grams


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer (in place on a fresh uint32 array)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


@dataclass(frozen=True)
class NgramFeatures:
    """The n-grams of a batch of documents: ``doc[i]`` is the document of n-gram ``i``, ``bucket[i]`` its bucket.

    ``tokens[d]`` is the number of tokens (unigrams) of document ``d``.
    """

    doc: np.ndarray
    bucket: np.ndarray
    tokens: np.ndarray

    @property
    def n_docs(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class _Grams:
    """The n-grams of a batch by token position: ``buckets[j][i]`` is the bucket of the (j+1)-gram starting at
    token ``i``, or ``buckets`` (one past the last bucket) where that n-gram would cross into the next document.
    ``first[d]`` is the first token of document ``d``, ``tokens[d]`` its number of tokens.
    """

    buckets: list[np.ndarray]
    first: np.ndarray
    tokens: np.ndarray


HASHES = ("fast", "sha256")
_CACHE_LIMIT = 5_000_000  # n-grams whose SHA-256 bucket a hasher remembers (then it starts afresh)


class NgramHasher:
    """Unigram..``ngrams``-gram counts of texts hashed into ``buckets`` buckets (``ngrams=2``: uni- and bigrams).

    ``hash="fast"`` (default): the vectorized polynomial hash. ``hash="sha256"``: the reference package's
    buckets exactly (``int(sha256(ngram).hexdigest(), 16) % buckets`` of the n-gram's text, words joined
    by a space), computed once per distinct n-gram (remembered, up to 5 million) instead of once per
    occurrence: for parity checks and for weights comparable with ``data-selection``'s.
    """

    def __init__(self, buckets: int = 10_000, ngrams: int = 2, hash: str = "fast") -> None:
        self.buckets = whole(buckets, "buckets", maximum=1 << 31, meaning="hash buckets of the n-gram features")
        self.ngrams = whole(ngrams, "ngrams", maximum=len(_NGRAM_ADD) + 1, meaning="2: unigrams and bigrams")
        if hash not in HASHES:
            from whatmatters.core.errors import InputError

            raise InputError(f"unknown hash {hash!r}; choose one of {', '.join(HASHES)}")
        self.hash = hash
        self._sha_buckets: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"NgramHasher(buckets={self.buckets}, ngrams={self.ngrams}, hash={self.hash!r})"

    # ------------------------------------------------------------------ features
    def _grams(self, texts: Sequence[str]) -> _Grams:
        n_docs = len(texts)
        lowered = [t.lower() for t in texts]
        lengths = np.fromiter(map(len, lowered), dtype=np.int64, count=n_docs)
        joined = "\n".join(lowered)  # "\n" is whitespace: no token spans two documents
        if joined.isascii():
            points = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
        else:
            points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        n = len(points)
        if n == 0:
            return _Grams(
                [np.zeros(0, np.uint32)] * self.ngrams, np.zeros(n_docs, np.int64), np.zeros(n_docs, np.int64)
            )
        classes = _classify(points)
        # a token starts where a non-space class begins, ends where it stops
        change = np.empty(n + 1, bool)
        change[0] = change[n] = True
        np.not_equal(classes[1:], classes[:-1], out=change[1:n])
        inside = classes != WHITESPACE
        starts = np.flatnonzero(change[:n] & inside)
        ends = np.flatnonzero(change[1:] & inside) + 1
        doc_starts = np.zeros(n_docs, np.int64)
        np.cumsum(lengths[:-1] + 1, out=doc_starts[1:])
        first = np.searchsorted(starts, doc_starts)
        tokens = np.diff(first, append=len(starts))

        pw, inv = _POWERS.get(n)
        prefix = np.empty(n + 1, np.uint32)
        prefix[0] = 0
        np.cumsum(points * pw, out=prefix[1:], dtype=np.uint32)
        token_hash = _fmix32((prefix[ends] - prefix[starts]) * inv[starts])
        if self.hash == "sha256":
            return self._sha256_grams(joined, points, starts, ends, token_hash, first, tokens)

        sentinel = np.uint32(self.buckets)
        buckets = [token_hash % sentinel]
        t = len(token_hash)
        crossing = self._crossing(first, t)
        gram, cross = token_hash, crossing
        for size in range(2, self.ngrams + 1):
            m = t - size + 1
            if m <= 0:
                buckets.append(np.zeros(0, np.uint32))
                continue
            gram = _fmix32(gram[:m] * _NGRAM_MUL + token_hash[size - 1 :] + _NGRAM_ADD[size - 2])
            cross = cross[:m] if size == 2 else cross[:m] | crossing[size - 2 : size - 2 + m]
            bucket = gram % sentinel
            bucket[cross] = sentinel
            buckets.append(bucket)
        return _Grams(buckets, first, tokens)

    def _crossing(self, first: np.ndarray, t: int) -> np.ndarray:
        crossing = np.zeros(max(t - 1, 0), bool)  # the pair (i, i + 1) spans two documents
        later = first[1:][(first[1:] > 0) & (first[1:] < t)]
        crossing[later - 1] = True
        return crossing

    def _sha256_grams(self, joined, points, starts, ends, token_hash, first, tokens) -> _Grams:
        """The reference's buckets: SHA-256 of each distinct n-gram's text (64-bit keys find the distinct ones)."""
        import hashlib

        n = len(points)
        pw, inv = _POWERS2.get(n)
        prefix = np.empty(n + 1, np.uint32)
        prefix[0] = 0
        np.cumsum(points * pw, out=prefix[1:], dtype=np.uint32)
        second = _fmix32((prefix[ends] - prefix[starts]) * inv[starts])
        token_key = (token_hash.astype(np.uint64) << np.uint64(32)) | second.astype(np.uint64)
        t = len(token_key)
        crossing = self._crossing(first, t)
        sentinel = self.buckets
        cache = self._sha_buckets
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        buckets, key, cross = [], token_key, crossing
        for size in range(1, self.ngrams + 1):
            m = t - size + 1
            if m <= 0:
                buckets.append(np.zeros(0, np.uint32))
                continue
            if size > 1:
                key = splitmix64(key[:m] * np.uint64(0x9E3779B97F4A7C15) + token_key[size - 1 :])
                cross = cross[:m] if size == 2 else cross[:m] | crossing[size - 2 : size - 2 + m]
            distinct, where, inverse = np.unique(key, return_index=True, return_inverse=True)
            lookup = np.fromiter((cache.get(k, -1) for k in distinct.tolist()), np.int64, count=len(distinct))
            for j in np.flatnonzero(lookup < 0).tolist():
                i = int(where[j])
                text = " ".join(joined[starts[i + o] : ends[i + o]] for o in range(size))
                digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()  # = int(hexdigest, 16)
                lookup[j] = cache[int(distinct[j])] = int.from_bytes(digest, "big") % sentinel
            bucket = lookup[inverse.reshape(-1)].astype(np.uint32)
            if size > 1:
                bucket[cross] = sentinel
            buckets.append(bucket)
        return _Grams(buckets, first, tokens)

    def features(self, texts: Sequence[str]) -> NgramFeatures:
        """Every n-gram of every text: its document and its bucket (vectorized over the whole batch)."""
        g = self._grams(texts)
        token_doc = np.repeat(np.arange(len(texts)), g.tokens)
        docs, buckets = [], []
        for bucket in g.buckets:
            keep = bucket != self.buckets
            docs.append(token_doc[: len(bucket)][keep])
            buckets.append(bucket[keep])
        return NgramFeatures(np.concatenate(docs), np.concatenate(buckets).astype(np.int64), g.tokens)

    def counts(self, texts: Sequence[str]) -> np.ndarray:
        """Total count of each bucket over all ``texts`` (int64, length ``buckets``)."""
        g = self._grams(texts)
        total = np.zeros(self.buckets + 1, np.int64)
        for bucket in g.buckets:
            total += np.bincount(bucket, minlength=self.buckets + 1)
        return total[: self.buckets]

    def matrix(self, texts: Sequence[str]):
        """Per-document bucket counts as a SciPy CSR matrix ``(len(texts), buckets)``."""
        from scipy.sparse import csr_matrix

        f = self.features(texts)
        ones = np.ones(len(f.bucket), np.int64)
        m = csr_matrix((ones, (f.doc, f.bucket)), shape=(len(texts), self.buckets))
        m.sum_duplicates()
        return m

    def log_weights(self, texts: Sequence[str], log_ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sum over each text's n-grams of ``log_ratio[bucket]``, the number of tokens of each text)."""
        g = self._grams(texts)
        ratio = np.append(np.asarray(log_ratio, np.float64), 0.0)  # the crossing n-grams count 0
        contribution = ratio[g.buckets[0]]
        for bucket in g.buckets[1:]:
            contribution[: len(bucket)] += ratio[bucket]
        weights = np.zeros(len(texts))
        has = g.tokens > 0
        if len(contribution):
            weights[has] = np.add.reduceat(contribution, g.first[has])
        return weights, g.tokens
