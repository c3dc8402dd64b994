"""Corpus reading, tokenization, packing and splits."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from actstore import corpus as corpus_mod
from actstore.corpus import CorpusOptions, corpus_change, corpus_fingerprint, iter_documents, token_sequences
from actstore.errors import UsageError
from actstore.grammar import N_DOCUMENTS, builtin_document, builtin_documents
from actstore.tiny import EOT_ID, byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _stream(opts, tok, **kw) -> np.ndarray:
    return np.concatenate([b.reshape(-1) for b in token_sequences(opts, tok, **kw)])


def test_builtin_corpus_is_the_same_bytes_everywhere():
    # Pinned digest of the first 200 documents: a change to the grammar or to Python's seeded
    # generator would silently change every store and model trained on it.
    digest = hashlib.sha256("\x00".join(builtin_documents(0, 200)).encode()).hexdigest()
    assert digest == BUILTIN_DIGEST


def test_builtin_corpus_has_at_least_8M_tokens():
    n_tokens = sum(len(text.encode("utf-8")) + 1 for text in builtin_documents())  # +1: end-of-text
    assert n_tokens >= 8_000_000


def test_builtin_documents_regenerate_alone_and_cover_every_genre():
    texts = list(builtin_documents(100, 130))
    assert texts[7] == builtin_document(107)[0]
    genres = {builtin_document(i)[1] for i in range(300)}
    assert genres == {"facts", "story", "dialogue", "arithmetic", "inventory", "letter"}
    assert N_DOCUMENTS > 1000


def test_byte_fast_path_matches_the_hf_tokenizer(tok):
    for text in list(builtin_documents(0, 20)) + ["naïve café — ünïcode ✓\n\ttabs"]:
        fast = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).tolist()
        assert tok(text, add_special_tokens=False)["input_ids"] == fast


def test_packing_is_the_document_stream_cut_into_sequences(tok):
    opts = CorpusOptions(corpus="builtin", seq_len=50)
    seqs = np.concatenate(list(token_sequences(opts, tok, batch_seqs=7)))
    assert seqs.shape[1] == 50 and seqs.dtype == np.int32
    flat = seqs[:40].reshape(-1)
    expected = []
    for text in builtin_documents(0, 200):
        expected += list(text.encode("utf-8")) + [EOT_ID]
        if len(expected) > flat.size:
            break
    assert flat.tolist() == expected[: flat.size]


def test_skip_tokens_and_resume_offsets_continue_the_same_stream(tok):
    base = _stream(CorpusOptions(corpus="builtin", seq_len=32), tok, batch_seqs=4)[: 32 * 40]
    skipped = _stream(CorpusOptions(corpus="builtin", seq_len=32, skip_tokens=100), tok, batch_seqs=4)
    assert np.array_equal(skipped[: 32 * 20], base[100 : 100 + 32 * 20])
    resumed = _stream(CorpusOptions(corpus="builtin", seq_len=32), tok, batch_seqs=4, start_seq=8)
    assert np.array_equal(resumed[: 32 * 20], base[32 * 8 : 32 * 28])


def test_prepend_bos_starts_every_sequence_with_bos(tok):
    seqs = next(token_sequences(CorpusOptions(corpus="builtin", seq_len=16, prepend_bos=True), tok, batch_seqs=5))
    assert (seqs[:, 0] == EOT_ID).all()
    body = seqs[:, 1:].reshape(-1)
    plain = next(token_sequences(CorpusOptions(corpus="builtin", seq_len=15), tok, batch_seqs=5)).reshape(-1)
    assert np.array_equal(body, plain)


def test_train_and_eval_splits_share_no_document(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    # every document is 21 tokens with its separator, so seq_len 3 packs both splits without a remainder
    path.write_text("".join(json.dumps({"text": f"document number {i:03d}."}) + "\n" for i in range(60)))
    seen = {}
    for split in ("train", "eval"):
        docs = bytes(_stream(CorpusOptions(corpus=str(path), split=split, seq_len=3), tok).astype(np.uint8))
        seen[split] = {int(n) for n in docs.replace(bytes([0]), b"").split(b"number ")[1:] for n in [n[:3]]}
    assert seen["eval"] == {i for i in range(60) if i % 20 == 19}
    assert not seen["train"] & seen["eval"]


def test_every_corpus_format_gives_the_same_documents(tmp_path):
    import datasets
    import polars as pl

    texts = ["alpha beta", "gamma delta", "epsilon"]
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pl.DataFrame({"body": texts}).write_parquet(tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "hf"))
    assert list(iter_documents(str(tmp_path / "txt"))) == texts
    assert list(iter_documents(str(tmp_path / "txt" / "*.txt"))) == texts
    assert list(iter_documents(str(tmp_path / "c.jsonl"), "body")) == texts
    assert list(iter_documents(str(tmp_path / "c.parquet"), "body")) == texts
    fingerprints = {spec: corpus_fingerprint(str(tmp_path / spec)) for spec in ("txt", "c.parquet", "hf")}
    assert list(iter_documents(str(tmp_path / "hf"), "body")) == texts
    for spec, fp in fingerprints.items():  # reading wrote nothing into the corpus (datasets keeps no cache there)
        assert corpus_change(fp, str(tmp_path / spec)) is None
    assert fingerprints["hf"]["n_files"] >= 2  # a saved dataset counts file by file


def test_pretokenized_arrays_are_used_as_they_are(tmp_path, tok):
    import polars as pl

    rows = np.arange(3 * 8).reshape(3, 8) % 250
    np.save(tmp_path / "rows.npy", rows)
    seqs = np.concatenate(list(token_sequences(CorpusOptions(corpus=str(tmp_path / "rows.npy"), seq_len=8), tok)))
    assert np.array_equal(seqs, rows)
    pl.DataFrame({"input_ids": rows.tolist()}).write_parquet(tmp_path / "rows.parquet")
    seqs = np.concatenate(list(token_sequences(CorpusOptions(corpus=str(tmp_path / "rows.parquet"), seq_len=8), tok)))
    assert np.array_equal(seqs, rows)


def test_missing_corpus_and_missing_column_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="matches no readable file"):
        list(iter_documents(str(tmp_path / "nothing-here*.txt")))
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UsageError, match="--text-column"):
        list(iter_documents(str(tmp_path / "c.jsonl")))


def _touch(path, later: float = 100.0) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + int(later * 1e9)))


def test_fingerprint_names_the_first_file_that_changed_and_content_beats_mtime(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    spec = str(tmp_path / "*.txt")
    fp = corpus_fingerprint(spec)
    assert fp["content_hashed"] and [e["size"] for e in fp["files"]] == [5, 4]
    assert fp["files"][0]["sha256"] == hashlib.sha256(b"alpha").hexdigest()
    assert corpus_change(fp, spec) is None
    _touch(tmp_path / "a.txt")
    assert corpus_change(fp, spec) is None  # same bytes, new mtime: the content decides
    (tmp_path / "b.txt").write_text("BETA")
    assert corpus_change(fp, spec) == f"{tmp_path / 'b.txt'} changed content (its sha256 differs)"
    (tmp_path / "b.txt").write_text("beta!")
    assert corpus_change(fp, spec) == f"{tmp_path / 'b.txt'} changed size (4 → 5 bytes)"
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / "c.txt").write_text("gamma")
    assert corpus_change(fp, spec) == f"{tmp_path / 'c.txt'} was added"
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).unlink()
    assert corpus_change(fp, spec) == f"{tmp_path / 'a.txt'} was removed"  # even when nothing matches any more


def test_a_corpus_too_large_to_hash_is_compared_by_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "HASH_LIMIT", 4)
    (tmp_path / "a.txt").write_text("alpha")
    fp = corpus_fingerprint(str(tmp_path))
    assert not fp["content_hashed"] and "sha256" not in fp["files"][0]
    assert corpus_change(fp, str(tmp_path)) is None
    _touch(tmp_path / "a.txt")
    assert "a.txt was modified (its mtime changed" in corpus_change(fp, str(tmp_path))


def test_a_corpus_of_many_files_keeps_only_their_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "LIST_LIMIT", 1)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(name)
    fp = corpus_fingerprint(str(tmp_path))
    assert "files" not in fp and fp["n_files"] == 2 and len(fp["digest"]) == 64
    _touch(tmp_path / "a.txt")
    assert corpus_change(fp, str(tmp_path)) is None
    (tmp_path / "a.txt").write_text("A.txt")
    assert corpus_change(fp, str(tmp_path)) == "the contents of some of its 2 files changed"
    (tmp_path / "c.txt").write_text("c")
    assert corpus_change(fp, str(tmp_path)) == "it had 2 files of 10 bytes, now 3 of 11"


def test_the_builtin_fingerprint_is_a_digest_of_sampled_documents():
    fp = corpus_fingerprint("builtin")
    assert fp == corpus_fingerprint("builtin") and fp["kind"] == "builtin" and fp["n_documents"] == N_DOCUMENTS
    assert corpus_change(fp, "builtin") is None
    assert "builtin corpus generates other documents" in corpus_change({**fp, "sha256": "0" * 64}, "builtin")


BUILTIN_DIGEST = "53fbdea12b564d0e669ab43fb222c017da185f5a21a3d99165ac6d1335638680"
