"""Corpus loading, tokenizer, packing with document boundaries, validation split."""

import json

import numpy as np
import pytest
import torch

from prope_kernels.data import Batches, load_documents, make_batch, pack, split_docs
from prope_kernels.data.corpus import builtin_corpus
from prope_kernels.reference import varlen_positions


def test_builtin_corpus_is_real_text():
    docs = builtin_corpus()
    text = "\n".join(docs)
    assert len(docs) > 500 and len(text) > 1_000_000
    assert text.count(" the ") > 5000  # English prose, not random tokens
    assert builtin_corpus() == docs   # deterministic


def test_pack_keeps_document_boundaries():
    docs = [list(range(100, 100 + n)) for n in (5, 12, 3, 30, 7)]
    data = pack(docs, 16)
    assert data.tokens.shape == (3, 16)  # 57 tokens -> 3 full rows, tail dropped
    assert [sum(s) for s in data.seg_lens] == [16, 16, 16]
    assert data.seg_lens[0] == [5, 11] and data.seg_lens[1] == [1, 3, 12]
    toks, targets, cu, max_len = make_batch(data, [0, 1])
    assert cu.tolist() == [0, 5, 16, 17, 20, 32] and max_len == 12
    # next-token targets inside a segment, -100 at each segment's last token
    assert targets[0, :4].tolist() == toks[0, 1:5].tolist() and targets[0, 4] == -100
    assert targets[1, 0] == -100  # a one-token segment predicts nothing
    pos = varlen_positions(cu, 32)
    assert pos[:6].tolist() == [0, 1, 2, 3, 4, 0] and pos[16:21].tolist() == [0, 0, 1, 2, 0]


def test_split_is_disjoint_and_seeded():
    docs = [f"doc {i}" for i in range(100)]
    tr, va = split_docs(docs, 0.1, seed=3)
    assert len(va) == 10 and not set(tr) & set(va) and sorted(tr + va) == sorted(docs)
    assert split_docs(docs, 0.1, seed=3) == (tr, va)


def test_batches_are_deterministic_and_resumable():
    data = pack([list(range(64))] * 20, 16)
    a = Batches(data, 4, seed=1)
    first = [a.next()[0] for _ in range(7)]
    b = Batches(data, 4, seed=1)
    b.position = 5
    assert torch.equal(b.next()[0], first[5])
    with pytest.raises(ValueError, match="rows of data"):
        Batches(data, 1000)


def test_two_ranks_split_the_global_batch():
    data = pack([list(range(64))] * 20, 16)
    whole = Batches(data, 4, seed=2).rows(3)
    parts = [Batches(data, 4, seed=2, rank=r, world=2).rows(3) for r in (0, 1)]
    assert parts[0] + parts[1] == whole


def test_load_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    assert load_documents(str(tmp_path)) == ["first document", "second", "third"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_documents(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "missing"))


def test_tokenizer_trains_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPE_CACHE", str(tmp_path))
    from prope_kernels.data import tokenize, train_tokenizer
    docs = builtin_corpus()[:200]
    tok = train_tokenizer(docs, 512)
    assert tok.get_piece_size() == 512
    ids = tokenize(["The quick brown fox."], tok)[0]
    assert ids[0] == tok.bos_id() and ids[-1] == tok.eos_id()
    assert tok.decode(ids[1:-1]) == "The quick brown fox."
    assert len(list(tmp_path.glob("spm_*.model"))) == 1  # cached
    assert np.array_equal(tokenize(["x y"], train_tokenizer(docs, 512))[0],
                          tokenize(["x y"], tok)[0])
