"""Data for the trainer: corpora (corpus.py) and tokenization + packing (packing.py)."""

import importlib.util

_MISSING = [m for m in ("numpy", "sentencepiece", "safetensors", "tqdm")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    raise ImportError(f"the trainer needs {', '.join(_MISSING)}: pip install "
                      "'prope-kernels[train]' (from a clone: pip install '.[train]')")

from .corpus import builtin_corpus, load_documents
from .packing import Batches, PackedData, make_batch, pack, split_docs, tokenize, \
    load_tokenizer, train_tokenizer

__all__ = ["builtin_corpus", "load_documents", "Batches", "PackedData", "make_batch", "pack",
           "split_docs", "tokenize", "load_tokenizer", "train_tokenizer"]
