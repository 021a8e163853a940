"""DSIR (whatmatters.curate.dsir): the hashed n-gram features, the selection, the file pipeline, resume, errors.

The corpora are synthetic topic mixtures with known labels (``topic_corpus``): every topic has its own
vocabulary next to a shared one, so DSIR's target-topic precision is measurable against random.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters.curate import dsir, dsir_weights, gumbel_topk
from whatmatters.curate import shards as sh
from whatmatters.curate.hashing import NgramHasher


def raises(*words: str):
    pattern = "".join(f"(?=.*{re.escape(w)})" for w in words)
    return pytest.raises(wm.InputError, match=re.compile(pattern, re.IGNORECASE | re.DOTALL))


# ------------------------------------------------------------------ data
def topic_corpus(n_per_topic: int, topics: int = 5, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Documents of ``topics`` topics (labels 0..topics-1): Zipf words of the topic's and a shared vocabulary."""
    rng = np.random.default_rng(seed)
    shared = np.array([f"common{i}" for i in range(400)] + ["the", "a", "of", "and", ",", "."])
    vocabularies = [np.array([f"topic{t}word{i}" for i in range(150)]) for t in range(topics)]

    def zipf(n: int) -> np.ndarray:
        p = 1.0 / np.arange(1, n + 1)
        return p / p.sum()

    texts, labels = [], []
    for t in range(topics):
        for _ in range(n_per_topic):
            n = int(rng.integers(30, 120))
            own = rng.random(n) < 0.35
            words = rng.choice(shared, n, p=zipf(len(shared)))
            words[own] = rng.choice(vocabularies[t], int(own.sum()), p=zipf(150))
            texts.append(" ".join(words))
            labels.append(t)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.asarray(labels)[order]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A target of topic 0 and a raw pool of 5 topics in 3 JSON-lines shards (one gzipped) and 1 Parquet shard."""
    folder = tmp_path_factory.mktemp("dsir")
    target, _ = topic_corpus(200, topics=1, seed=1)
    raw, labels = topic_corpus(120, topics=5, seed=2)
    write_jsonl(folder / "target.jsonl", [{"text": t} for t in target])
    records = [
        {"text": t, "topic": int(y), "id": i, "meta": {"n": len(t)}} for i, (t, y) in enumerate(zip(raw, labels))
    ]
    parts = np.array_split(np.arange(len(records)), 4)
    write_jsonl(folder / "raw" / "a.jsonl", [records[i] for i in parts[0]])
    write_jsonl(folder / "raw" / "b.jsonl", [records[i] for i in parts[1]])
    with gzip.open(folder / "raw" / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(records[i]) + "\n" for i in parts[2])
    parquet = pa.Table.from_pylist([records[i] for i in parts[3]])
    pq.write_table(parquet, folder / "raw" / "d.parquet", row_group_size=50)
    return folder, raw, labels


def selected_table(result) -> pd.DataFrame:
    frame = result.read()
    return frame.sort_values(["dsir_source", "dsir_row"]).reset_index(drop=True)


# ------------------------------------------------------------------ features
def reference_buckets(text: str, buckets: int, ngrams: int = 2) -> list[int]:
    """The buckets of one text, one n-gram at a time in pure Python (the definition ``NgramHasher`` vectorizes)."""
    mask = (1 << 32) - 1

    def fmix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & mask
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & mask
        return h ^ (h >> 16)

    def token_hash(token: str) -> int:
        return fmix(sum(ord(c) * pow(0x01000193, i, 1 << 32) for i, c in enumerate(token)) & mask)

    adds = (0x7F4A7C15, 0x2545F491, 0x6C8E9CF5, 0xB5297A4D)
    hashes = [token_hash(t) for t in re.findall(r"\w+|[^\w\s]+", text.lower())]
    out = [h % buckets for h in hashes]
    gram = hashes
    for size in range(2, ngrams + 1):
        gram = [fmix((g * 0x9E3779B1 + h + adds[size - 2]) & mask) for g, h in zip(gram, hashes[size - 1 :])]
        out += [g % buckets for g in gram]
    return sorted(out)


@pytest.mark.parametrize("ngrams", [1, 2, 3])
def test_vectorized_hashing_equals_the_one_ngram_at_a_time_definition(ngrams):
    texts = ["Hello, World!! don't stop", "", "  \n ", "a", "x_y 123 4.5 -- (ok)", "The the THE; the", "b c"]
    texts += topic_corpus(3, topics=2)[0]
    hasher = NgramHasher(buckets=997, ngrams=ngrams)
    f = hasher.features(texts)
    for d, text in enumerate(texts):
        assert sorted(f.bucket[f.doc == d].tolist()) == reference_buckets(text, 997, ngrams)
    assert f.tokens.tolist() == [len(re.findall(r"\w+|[^\w\s]+", t.lower())) for t in texts]
    # counts and weights agree with the features, batching does not change a document's buckets
    np.testing.assert_array_equal(hasher.counts(texts), np.bincount(f.bucket, minlength=997))
    ratio = np.random.default_rng(0).normal(size=997)
    weights, _ = hasher.log_weights(texts, ratio)
    np.testing.assert_allclose(weights, np.bincount(f.doc, weights=ratio[f.bucket], minlength=len(texts)), atol=1e-9)
    alone = hasher.features(texts[4:5])
    assert sorted(alone.bucket.tolist()) == sorted(f.bucket[f.doc == 4].tolist())
    assert hasher.matrix(texts).sum() == len(f.bucket)


def test_tokens_are_the_reference_packages_wordpunct_tokens_on_unicode():
    nltk = pytest.importorskip("nltk.tokenize")
    texts = [
        "Ünïcödé — “quotes” 😀x_y ² ½ İstanbul ΣΑΣ",
        "naïve café; 東京は晴れ。 Ⓐbc",
        "tab\tand\u00a0nbsp\u2003em",
        "mañana!!! ¿qué? «non» ‹oui›",
    ]
    tokens = NgramHasher().features(texts).tokens
    assert tokens.tolist() == [len(nltk.WordPunctTokenizer().tokenize(t.lower())) for t in texts]


def test_sha256_buckets_are_the_reference_packages_features_exactly():
    reference = pytest.importorskip("data_selection.hashed_ngram_dsir")
    texts = topic_corpus(4, topics=3)[0] + ["Hello, World!! don't stop", "", "naïve café; x_y 4.5 -- (ok)", "a b a b"]
    hasher = NgramHasher(hash="sha256")
    ours = hasher.matrix(texts).toarray()
    theirs = np.stack([reference.get_ngram_counts(t, n=2, num_buckets=10_000) for t in texts])
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(hasher.matrix(texts).toarray(), theirs)  # again, from the remembered buckets
    three = NgramHasher(buckets=500, ngrams=3, hash="sha256").matrix(texts).toarray()
    np.testing.assert_array_equal(three, np.stack([reference.get_ngram_counts(t, n=3, num_buckets=500) for t in texts]))


def test_hasher_checks_its_settings():
    with raises("buckets", "integer"):
        NgramHasher(buckets=0)
    with raises("ngrams"):
        NgramHasher(ngrams=9)
    with raises("unknown hash 'md5'"):
        NgramHasher(hash="md5")


# ------------------------------------------------------------------ in memory
def test_dsir_weights_raise_target_topic_precision_far_above_random():
    target, _ = topic_corpus(300, topics=1, seed=3)
    raw, labels = topic_corpus(200, topics=5, seed=4)
    imp = dsir_weights(target, raw)
    assert isinstance(imp, wm.Importance) and imp.unit == "document" and imp.values.shape == (len(raw),)
    assert imp.method == "dsir" and imp.params["buckets"] == 10_000 and len(imp.extra["tokens"]) == len(raw)
    k = 200
    chosen = gumbel_topk(imp, k, seed=0)
    precision = float(np.mean(labels[chosen] == 0))
    random = float(np.mean(labels[np.random.default_rng(0).choice(len(raw), k, replace=False)] == 0))
    assert precision > 0.95 and random < 0.35, (precision, random)
    assert len(set(chosen.tolist())) == k
    # top-k takes the largest weights; the sample is seeded
    top = gumbel_topk(imp, k, topk=True)
    np.testing.assert_array_equal(np.sort(top), np.sort(np.argsort(-imp.numpy())[:k]))
    np.testing.assert_array_equal(gumbel_topk(imp, k, seed=0), chosen)
    assert not np.array_equal(gumbel_topk(imp, k, seed=1), chosen)


def test_gumbel_topk_samples_in_proportion_to_the_weights():
    weights = np.log(np.array([1.0, 2.0, 3.0, 4.0]))
    hits = np.zeros(4)
    for seed in range(4000):
        hits[gumbel_topk(weights, 1, seed=seed)] += 1
    np.testing.assert_allclose(hits / hits.sum(), [0.1, 0.2, 0.3, 0.4], atol=0.025)


def test_in_memory_inputs_are_checked():
    with raises("target_texts", "empty"):
        dsir_weights([], ["a"])
    with raises("raw_texts[1]", "not a string"):
        dsir_weights(["a"], ["a", 3])
    with raises("list of texts"):
        dsir_weights("abc", ["a"])
    with raises("k=5", "larger than the pool"):
        gumbel_topk([0.0, 1.0], 5)


# ------------------------------------------------------------------ the file pipeline
def test_pipeline_selects_the_target_topic_and_keeps_every_field(corpus, tmp_path):
    folder, raw, _ = corpus
    k = 120
    result = dsir(folder / "target.jsonl", str(folder / "raw" / "*"), k, tmp_path / "run", workers=1)
    assert result.selected == k and result.documents == len(raw) and result.bad_lines == 0
    assert result.raw_files == 4 and result.target_documents == 200
    frame = selected_table(result)
    assert len(frame) == k and frame["id"].is_unique
    precision = float(np.mean(frame["topic"] == 0))
    assert precision > 0.9, precision  # random: 0.2
    # every original field, plus the log weight, the file and the row
    assert {"text", "topic", "id", "meta", "dsir_log_weight", "dsir_source", "dsir_row"} <= set(frame.columns)
    for _, row in frame.sample(10, random_state=0).iterrows():
        assert row["text"] == raw[row["id"]] and row["meta"]["n"] == len(row["text"])
    # the weights match the in-memory DSIR on the same texts (same features, same models)
    memory = dsir_weights([json.loads(x)["text"] for x in (folder / "target.jsonl").read_text().splitlines()], raw)
    weights = result.weights()
    by_id = {}
    for source, rows in weights.groupby("source"):
        table = pq.read_table(source) if source.endswith(".parquet") else None
        lines = None if table is not None else _lines(Path(source))
        for row, w in zip(rows["row"], rows["log_weight"]):
            record = table.slice(row, 1).to_pylist()[0] if table is not None else json.loads(lines[row])
            by_id[record["id"]] = w
    np.testing.assert_allclose([by_id[i] for i in range(len(raw))], memory.numpy(), rtol=1e-9, atol=1e-9)
    # dsir_row finds the document again in its file
    for _, row in frame.head(5).iterrows():
        if row["dsir_source"].endswith(".jsonl"):
            assert json.loads(_lines(Path(row["dsir_source"]))[row["dsir_row"]])["id"] == row["id"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selected"] == k and summary["documents"] == len(raw)


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return f.read().splitlines()


def test_pieces_workers_and_engines_do_not_change_the_selection(corpus, tmp_path):
    folder, _, _ = corpus
    # target = the pool itself: every log weight is 0, the sample is uniform and only the noise decides
    args = (folder / "raw", folder / "raw", 100)
    one = dsir(*args, tmp_path / "one", workers=1)
    assert np.allclose(one.weights()["log_weight"], 0)
    many = dsir(*args, tmp_path / "many", workers=2, piece_bytes=4096)
    assert many.pieces > one.pieces >= 4
    a, b = selected_table(one), selected_table(many)
    pd.testing.assert_frame_equal(a, b)
    other_seed = selected_table(dsir(*args, tmp_path / "seed1", workers=1, seed=1))
    assert len(set(other_seed["id"]) & set(a["id"])) < 50  # two uniform samples of 100 out of 600


def test_one_clean_file_selects_what_the_in_memory_api_selects(corpus, tmp_path):
    folder = corpus[0]
    texts = [json.loads(line)["text"] for line in _lines(folder / "raw" / "a.jsonl")]
    target = [json.loads(line)["text"] for line in _lines(folder / "target.jsonl")]
    result = dsir(folder / "target.jsonl", folder / "raw" / "a.jsonl", 20, tmp_path / "run", seed=3)
    chosen = gumbel_topk(dsir_weights(target, texts), 20, seed=3)
    assert sorted(result.read()["dsir_row"]) == sorted(chosen.tolist())


def test_the_raw_model_can_be_fitted_on_a_sample(corpus, tmp_path):
    folder, _, _ = corpus
    full = dsir(folder / "target.jsonl", folder / "raw", 50, tmp_path / "all", raw_sample_tokens="all", workers=1)
    auto = dsir(folder / "target.jsonl", folder / "raw", 50, tmp_path / "auto", workers=1)
    pd.testing.assert_frame_equal(selected_table(full), selected_table(auto))  # auto: all of a small pool
    sample = dsir(folder / "target.jsonl", folder / "raw", 50, tmp_path / "sample", raw_sample_tokens=2000, workers=1)
    with np.load(tmp_path / "sample" / "model.npz") as f, np.load(tmp_path / "all" / "model.npz") as g:
        assert f["raw_counts"].sum() < g["raw_counts"].sum() / 4
    assert np.mean(selected_table(sample)["topic"] == 0) > 0.8


def test_quotas_select_that_many_documents_of_each_domain(corpus, tmp_path):
    folder, _, _ = corpus
    result = dsir(
        folder / "target.jsonl", folder / "raw", 60, tmp_path / "q", domain_field="topic", quotas={"1": 0.5, "2": 0.5}
    )
    frame = selected_table(result)
    assert frame["topic"].value_counts().to_dict() == {1: 30, 2: 30}
    assert result.selected_by_domain == {"1": 30, "2": 30}
    counts = dsir(
        folder / "target.jsonl", folder / "raw", 7, tmp_path / "q", domain_field="topic", quotas={"0": 5, "3": 2}
    )
    assert selected_table(counts)["topic"].value_counts().to_dict() == {0: 5, 3: 2}  # weights reused
    assert counts.reused["weigh"] == counts.pieces
    with raises("quota of domain '4'", "only"):
        dsir(folder / "target.jsonl", folder / "raw", 500, tmp_path / "q", domain_field="topic", quotas={"4": 500})
    with raises("quotas need domain_field"):
        dsir(folder / "target.jsonl", folder / "raw", 5, tmp_path / "x", quotas={"a": 5})
    with raises("add up to 4", "not k=5"):
        dsir(folder / "target.jsonl", folder / "raw", 5, tmp_path / "x", domain_field="topic", quotas={"1": 4})
    with raises("fractions must add up to 1"):
        dsir(folder / "target.jsonl", folder / "raw", 5, tmp_path / "x", domain_field="topic", quotas={"1": 0.4})


def test_min_tokens_and_topk(corpus, tmp_path):
    folder, _, _ = corpus
    result = dsir(folder / "target.jsonl", folder / "raw", 40, tmp_path / "t", min_tokens=80, topk=True, workers=1)
    frame = selected_table(result)
    assert (frame["text"].str.split().str.len() >= 80).all()
    weights = result.weights()
    eligible = weights[weights["tokens"] >= 80]
    assert np.isclose(frame["dsir_log_weight"].min(), eligible["log_weight"].nlargest(40).min())
    with raises("k=400", "larger than the raw pool", "shorter than min_tokens=110"):
        dsir(folder / "target.jsonl", folder / "raw", 400, tmp_path / "t", min_tokens=110)


# ------------------------------------------------------------------ resume
class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("stage", ["fit", "weigh", "write"])
def test_an_interrupted_run_resumed_writes_what_an_uninterrupted_run_writes(corpus, tmp_path, monkeypatch, stage):
    folder, _, _ = corpus
    args = (folder / "target.jsonl", str(folder / "raw" / "*"), 150)
    options = {"workers": 1, "piece_bytes": 8192}
    clean = dsir(*args, tmp_path / "clean", **options)
    assert clean.pieces >= 8

    calls = {"n": 0}
    real_table, real_arrays = sh.write_table, sh.write_arrays

    def crashing(real, where):
        def write(*a, **kw):
            path = Path(a[1] if real is real_table else a[0])
            if path.parent.name == where:
                calls["n"] += 1
                if calls["n"] > 3:  # the fourth file of the stage: the process dies
                    raise Crash(f"simulated crash writing {path}")
            return real(*a, **kw)

        return write

    if stage == "fit":
        monkeypatch.setattr(sh, "write_arrays", crashing(real_arrays, "_counts"))
    else:
        monkeypatch.setattr(sh, "write_table", crashing(real_table, "weights" if stage == "weigh" else "selected"))
    with pytest.raises(Crash):
        dsir(*args, tmp_path / "run", **options)
    monkeypatch.undo()
    resumed = dsir(*args, tmp_path / "run", **options)
    reused = {"fit": resumed.reused["fit"], "weigh": resumed.reused["weigh"], "write": resumed.reused["write"]}
    assert reused[stage] == 3, reused
    pd.testing.assert_frame_equal(selected_table(resumed), selected_table(clean))
    pd.testing.assert_frame_equal(resumed.weights(), clean.weights())
    assert not list((tmp_path / "run").rglob("*.tmp"))  # no temporary file left behind
    # a third run reuses everything
    again = dsir(*args, tmp_path / "run", **options)
    assert again.reused["weigh"] == again.pieces and again.reused["write"] == len(again.selected_files)


def test_damaged_and_stale_files_are_written_again(corpus, tmp_path):
    folder, _, _ = corpus
    args = (folder / "target.jsonl", folder / "raw", 80)
    first = dsir(*args, tmp_path / "run", workers=1, piece_bytes=8192)
    expected = selected_table(first)
    first.weights_files[2].write_bytes(b"PAR1 damaged")
    first.selected_files[0].write_bytes(b"garbage")
    second = dsir(*args, tmp_path / "run", workers=1, piece_bytes=8192)
    assert second.reused["weigh"] == second.pieces - 1
    pd.testing.assert_frame_equal(selected_table(second), expected)
    # another k: the weights are reused, the old selection's files replaced
    fewer = dsir(folder / "target.jsonl", folder / "raw", 30, tmp_path / "run", workers=1, piece_bytes=8192)
    assert fewer.reused["weigh"] == fewer.pieces and len(fewer.read()) == 30
    assert sorted((tmp_path / "run" / "selected").glob("*.parquet")) == sorted(fewer.selected_files)


def test_a_run_folder_of_other_settings_or_changed_files_is_refused(corpus, tmp_path):
    folder, _, _ = corpus
    raw = tmp_path / "raw.jsonl"
    raw.write_text((folder / "raw" / "a.jsonl").read_text())
    dsir(folder / "target.jsonl", raw, 10, tmp_path / "run")
    with raises("other buckets (10000, now 5000)", "--overwrite"):
        dsir(folder / "target.jsonl", raw, 10, tmp_path / "run", buckets=5000)
    with raises("other raw files"):
        dsir(folder / "target.jsonl", [raw, folder / "raw" / "b.jsonl"], 10, tmp_path / "run")
    with raw.open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with raises("changed since", "raw.jsonl"):
        dsir(folder / "target.jsonl", raw, 10, tmp_path / "run")
    result = dsir(folder / "target.jsonl", raw, 10, tmp_path / "run", overwrite=True)
    assert result.documents == 151 and result.reused["weigh"] == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with raises("not empty and holds no DSIR run"):
        dsir(folder / "target.jsonl", raw, 10, tmp_path / "mine")
    with raises("is a file"):
        dsir(folder / "target.jsonl", raw, 10, tmp_path / "mine" / "notes.txt")


def test_a_run_that_failed_before_any_work_can_be_rerun_with_other_settings(corpus, tmp_path):
    folder = corpus[0]
    with raises("raw file", "no 'body' field"):  # the target's counts are done when the raw piece fails
        dsir(
            folder / "target.jsonl", folder / "raw" / "a.jsonl", 5, tmp_path / "run",
            text_field="body", target_text_field="text", workers=1,
        )  # fmt: skip
    assert dsir(folder / "target.jsonl", folder / "raw" / "a.jsonl", 5, tmp_path / "run").selected == 5


def test_a_second_run_on_the_same_folder_at_the_same_time_is_refused(corpus, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running dsir holds it
        with raises("another DSIR run is using"):
            dsir(corpus[0] / "target.jsonl", corpus[0] / "raw" / "a.jsonl", 5, tmp_path / "run")
    assert dsir(corpus[0] / "target.jsonl", corpus[0] / "raw" / "a.jsonl", 5, tmp_path / "run").selected == 5


# ------------------------------------------------------------------ bad input
def test_bad_lines_are_counted_and_reported_never_dropped_silently(tmp_path):
    good = [{"text": f"document number {i} about things"} for i in range(20)]
    lines = [json.dumps(r) for r in good[:5]]
    lines += ['{"text": "unterminated', "[1, 2]", json.dumps({"body": "no text"}), json.dumps({"text": 7}), "", "  "]
    lines += [json.dumps(r) for r in good[5:]]
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe not utf-8\n")
    write_jsonl(tmp_path / "target.jsonl", good[:3])
    with pytest.warns(UserWarning, match="skipped 5 bad lines"):
        result = dsir(tmp_path / "target.jsonl", raw, 20, tmp_path / "run")
    assert result.documents == 20 and result.bad_lines == 5 and result.blank_lines == 2
    assert result.bad_examples[0] == f"{raw} line 6: invalid JSON (Unterminated string starting at, column 10)"
    reasons = " | ".join(result.bad_examples)
    for words in (
        "line 7: a JSON array, not an object",
        "line 8: no 'text' field (its fields: body)",
        "line 9: 'text' is a number",
    ):
        assert words in reasons
    assert f"line {len(lines) + 1}: not UTF-8 text" in reasons
    with raises("k=21", "larger than the raw pool", "20 documents", "5 bad lines"):
        dsir(tmp_path / "target.jsonl", raw, 21, tmp_path / "run")
    with pytest.warns(UserWarning, match=f"skipped 5 bad lines of the target .first: {re.escape(str(raw))} line 6"):
        result = dsir(raw, tmp_path / "target.jsonl", 3, tmp_path / "run2")
    assert result.target_bad_lines == 5 and result.target_documents == 20


def test_a_wrong_text_field_fails_at_once(tmp_path):
    write_jsonl(tmp_path / "target.jsonl", [{"text": "a b c"}])
    write_jsonl(tmp_path / "raw.jsonl", [{"body": f"text {i}", "id": i} for i in range(500)])
    with raises("raw file", "none of its first 100", "no 'text' field (its fields: body, id)", "--text-field"):
        dsir(tmp_path / "target.jsonl", tmp_path / "raw.jsonl", 5, tmp_path / "run")
    write_jsonl(tmp_path / "few.jsonl", [{"body": "x"}] * 3)
    with raises("raw pool has no documents", "3 bad lines", "no 'text' field"):
        dsir(tmp_path / "target.jsonl", tmp_path / "few.jsonl", 1, tmp_path / "run2")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "raw.parquet")
    with raises("has no text column 'text'", "its columns are body"):
        dsir(tmp_path / "target.jsonl", tmp_path / "raw.parquet", 1, tmp_path / "run3")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with raises("column 'text' holds int64, not text"):
        dsir(tmp_path / "target.jsonl", tmp_path / "ints.parquet", 1, tmp_path / "run3")


def test_missing_paths_empty_globs_and_odd_files_are_clear_errors(tmp_path):
    write_jsonl(tmp_path / "target.jsonl", [{"text": "a b c"}])
    target = tmp_path / "target.jsonl"
    with raises("no such raw file or folder", "nope.jsonl"):
        dsir(target, tmp_path / "nope.jsonl", 1, tmp_path / "run")
    with raises("no files match the raw pattern", "*.jsonl"):
        dsir(target, str(tmp_path / "shards" / "*.jsonl"), 1, tmp_path / "run")
    (tmp_path / "empty_folder").mkdir()
    with raises("holds no JSON lines"):
        dsir(target, tmp_path / "empty_folder", 1, tmp_path / "run")
    (tmp_path / "data.csv").write_text("text\nabc\n")
    with raises("cannot read raw file", "data.csv"):
        dsir(target, tmp_path / "data.csv", 1, tmp_path / "run")
    with raises("no such target file"):
        dsir(tmp_path / "t.jsonl", target, 1, tmp_path / "run")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # a reader would block forever: refused before anything opens it
    with raises("not a regular file"):
        dsir(target, fifo, 1, tmp_path / "run")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with raises("not a Parquet file or damaged", "bad.parquet"):
        dsir(target, tmp_path / "bad.parquet", 1, tmp_path / "run")
    with raises("k must be an integer"):
        dsir(target, target, 0, tmp_path / "run")
    with raises("unknown engine 'spark'"):
        dsir(target, target, 1, tmp_path / "run", engine="spark")


def test_empty_files(tmp_path):
    write_jsonl(tmp_path / "target.jsonl", [{"text": "alpha beta"}])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    with raises("the target has no documents"):
        dsir(tmp_path / "empty.jsonl", tmp_path / "target.jsonl", 1, tmp_path / "r1")
    with raises("the raw pool has no documents"):
        dsir(tmp_path / "target.jsonl", [tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"], 1, tmp_path / "r2")
    (tmp_path / "empty.parquet").write_bytes(b"")
    write_jsonl(tmp_path / "raw" / "good.jsonl", [{"text": f"alpha {i}"} for i in range(5)])
    with pytest.warns(UserWarning, match="2 raw files hold no document"):
        result = dsir(
            tmp_path / "target.jsonl",
            [tmp_path / "raw" / "good.jsonl", tmp_path / "empty.jsonl", tmp_path / "empty.parquet"],
            3,
            tmp_path / "r3",
        )
    assert result.selected == 3 and sorted(p.name for p in result.empty_files) == ["empty.jsonl", "empty.parquet"]


def test_parquet_null_texts_are_bad_rows(tmp_path):
    write_jsonl(tmp_path / "target.jsonl", [{"text": "alpha beta"}])
    pq.write_table(pa.table({"text": ["alpha one", None, "beta two", None], "n": [1, 2, 3, 4]}), tmp_path / "r.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dsir(tmp_path / "target.jsonl", tmp_path / "r.parquet", 2, tmp_path / "run")
    assert result.documents == 2 and result.bad_lines == 2
    path = tmp_path / "r.parquet"
    assert result.bad_examples == [f"{path} row 1: null text ('text')", f"{path} row 3: null text ('text')"]
    assert sorted(result.read()["n"]) == [1, 3]


def test_json_fields_of_mixed_types_survive(tmp_path):
    write_jsonl(tmp_path / "target.jsonl", [{"text": "alpha beta"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha 1", "x": 1}, {"text": "alpha 2", "x": "two"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "alpha 3", "y": [1, 2]}, {"text": "alpha 4"}])
    result = dsir(tmp_path / "target.jsonl", str(tmp_path / "?.jsonl"), 4, tmp_path / "run")
    frame = selected_table(result)
    assert frame["x"].tolist()[:2] == ["1", '"two"'] and list(frame["y"][2]) == [1, 2]
    assert pq.read_table(tmp_path / "run" / "selected").num_rows == 4  # one schema for the folder


def test_dsir_is_a_registered_curate_method():
    assert "dsir" in wm.methods(verb="curate") and "dsir" in wm.methods(unit="document")
    assert "buckets=10000" in wm.describe("dsir")
    with pytest.raises(wm.MethodError, match="curate method, not an explain method"):
        wm.explain(lambda x: x, np.zeros((1, 2)), "dsir")


# ------------------------------------------------------------------ properties
LINE_KINDS = st.sampled_from(["doc", "doc", "doc", "bad_json", "array", "no_field", "number", "blank"])


def _line(kind: str, text: str) -> str:
    return {
        "doc": json.dumps({"text": text, "n": 1}),
        "bad_json": "{" + json.dumps(text)[:-1],
        "array": json.dumps([text]),
        "no_field": json.dumps({"body": text}),
        "number": json.dumps({"text": len(text)}),
        "blank": " " * (len(text) % 3),
    }[kind]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(LINE_KINDS, st.text(max_size=40)), min_size=1, max_size=40))
def test_every_line_is_a_document_a_bad_line_or_a_blank_line(lines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prop")
    write_jsonl(folder / "target.jsonl", [{"text": "alpha beta gamma"}])
    raw = folder / "raw.jsonl"
    raw.write_text("".join(_line(kind, text) + "\n" for kind, text in lines))
    counts = {kind: sum(k == kind for k, _ in lines) for kind in ("doc", "blank")}
    bad = len(lines) - counts["doc"] - counts["blank"]
    if counts["doc"] == 0:
        with raises("the raw pool has no documents"):
            dsir(folder / "target.jsonl", raw, 1, folder / "run")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dsir(folder / "target.jsonl", raw, counts["doc"], folder / "run", workers=1)
    assert (result.documents, result.bad_lines, result.blank_lines) == (counts["doc"], bad, counts["blank"])
    assert sorted(result.read()["dsir_row"]) == [i for i, (k, _) in enumerate(lines) if k == "doc"]


BMP_TEXT = st.text(alphabet=st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs", "Co", "Cn")), max_size=60)


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(BMP_TEXT, min_size=1, max_size=6))
def test_tokens_are_unicode_wordpunct_tokens(texts):
    regex = pytest.importorskip("regex")  # the engine NLTK's WordPunctTokenizer runs on
    tokens = NgramHasher().features(texts).tokens
    assert tokens.tolist() == [len(regex.findall(r"\w+|[^\w\s]+", t.lower())) for t in texts]


def test_progress_reports_every_stage_to_its_end(corpus, tmp_path):
    seen: dict[str, tuple[float, float]] = {}
    dsir(
        corpus[0] / "target.jsonl", corpus[0] / "raw", 10, tmp_path / "run", workers=1,
        progress=lambda stage, done, total: seen.__setitem__(stage, (done, total)),
    )  # fmt: skip
    assert list(seen) == ["fit n-gram models", "weigh raw documents", "select", "write selected documents"]
    assert all(done == total for done, total in seen.values())
