"""Tokenize documents and pack them into fixed-length rows with document boundaries.

A batch is ``tokens (batch, seqlen)``, ``targets (batch, seqlen)`` (-100 where the next token is
in another document) and ``cu_seqlens`` (num_segments + 1,) int32 over the flattened batch: each
document segment attends only to itself and its positions restart at 0 (the varlen op).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch

from .corpus import cache_dir, fingerprint


def train_tokenizer(docs: list[str], vocab_size: int):
    """A sentencepiece BPE model trained on ``docs``, cached by (corpus, vocab size)."""
    import sentencepiece as spm

    path = cache_dir() / f"spm_{fingerprint(docs)}_{vocab_size}.model"
    if not path.exists():
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(line for d in docs for line in d.splitlines() if line.strip()),
            model_writer=buf, vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
            byte_fallback=True, bos_id=1, eos_id=2, pad_id=0, unk_id=3,
            input_sentence_size=200_000, shuffle_input_sentence=False, num_threads=2,
            minloglevel=2)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)  # atomic: concurrent runs never read a half-written model
    return load_tokenizer(str(path))


def load_tokenizer(path: str):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=path)


@dataclass
class PackedData:
    """Token rows and the document segments inside each row."""

    tokens: np.ndarray          # (rows, seqlen) int32
    seg_lens: list              # per row: lengths of its document segments (sum = seqlen)

    def __len__(self):
        return self.tokens.shape[0]


def pack(docs_ids: list[list[int]], seqlen: int) -> PackedData:
    """Concatenate documents (each already [bos] + ids + [eos]) into rows of ``seqlen`` tokens.
    A document crossing a row boundary continues in the next row as a new segment; the tail
    that does not fill a row is dropped."""
    rows, segs, cur, cur_segs = [], [], [], []
    for ids in docs_ids:
        while ids:
            take = ids[:seqlen - len(cur)]
            ids = ids[len(take):]
            cur.extend(take)
            cur_segs.append(len(take))
            if len(cur) == seqlen:
                rows.append(cur)
                segs.append(cur_segs)
                cur, cur_segs = [], []
    tokens = np.asarray(rows, dtype=np.int32).reshape(len(rows), seqlen)
    return PackedData(tokens, segs)


def tokenize(docs: list[str], tok) -> list[list[int]]:
    ids = tok.encode(docs)
    return [[tok.bos_id()] + x + [tok.eos_id()] for x in ids]


def split_docs(docs: list[str], val_fraction: float, seed: int = 0):
    """Hold out whole documents for validation (a seeded shuffle, so runs agree)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(docs) * val_fraction)) if len(docs) > 1 else 0
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val


def make_batch(data: PackedData, rows: list[int], device=None):
    """tokens, targets (batch, seqlen) int64 and cu_seqlens (segments + 1,) int32."""
    toks = torch.from_numpy(data.tokens[rows].astype(np.int64))
    seqlen = toks.shape[1]
    targets = torch.full_like(toks, -100)
    lens, max_len = [], 0
    for r, row in enumerate(rows):
        start = 0
        for n in data.seg_lens[row]:
            # next-token targets inside the segment; its last token has none in this row
            targets[r, start:start + n - 1] = toks[r, start + 1:start + n]
            start += n
            lens.append(n)
            max_len = max(max_len, n)
    assert sum(lens) == len(rows) * seqlen
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    if device is not None:
        toks, targets, cu = toks.to(device), targets.to(device), cu.to(device)
    return toks, targets, cu, max_len


class Batches:
    """Deterministic batches: epoch e visits rows in a permutation seeded by (seed, e), so the
    data position of a run is just the number of batches drawn (what a checkpoint stores)."""

    def __init__(self, data: PackedData, batch_size: int, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if len(data) < batch_size:
            raise ValueError(f"only {len(data)} rows of data for a global batch of {batch_size} "
                             "rows: use more data, a smaller --batch-size or --seq-len")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = len(data) // batch_size
        self.position = 0

    def rows(self, index: int) -> list[int]:
        epoch, i = divmod(index, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        rows = perm[i * self.batch_size:(i + 1) * self.batch_size].tolist()
        per_rank = self.batch_size // self.world
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]

    def next(self, device=None):
        batch = make_batch(self.data, self.rows(self.position), device)
        self.position += 1
        return batch
