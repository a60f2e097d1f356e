"""Data for the trainer: corpora (corpus.py) and tokenization + packing (packing.py)."""

from .corpus import builtin_corpus, load_documents
from .packing import Batches, PackedData, make_batch, pack, split_docs, tokenize, \
    load_tokenizer, train_tokenizer

__all__ = ["builtin_corpus", "load_documents", "Batches", "PackedData", "make_batch", "pack",
           "split_docs", "tokenize", "load_tokenizer", "train_tokenizer"]
