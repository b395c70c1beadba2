"""The data layer: corpora (sources), tokenizers, a tokenized on-disk cache, and batching.

    from harness.data import prepare_data, iter_documents
    data = prepare_data("offline-english", "gpt2")
    x, y = data.train.sample_batch(8, 256, torch.Generator().manual_seed(0))  # [8, 256] each
    x, y, cu_seqlens = data.train.sample_document_batch(8, 256, generator)  # documents cut at eot
    for doc in iter_documents("offline-english", "validation"): ...

Corpora that must be installed first: ``bash scripts/prepare_corpora.sh`` (or ``make data``).
"""

from .batching import TokenDataset
from .documents import SPLITS, Document, split_by_hash, stable_unit_hash
from .errors import CorpusNotFoundError, DataError, UnreadablePathError
from .paths import cache_dir, corpora_dir
from .prepare import PreparedData, hub_downloads, iter_documents, prepare_data
from .sources import Source, available_sources, get_source, register_source
from .token_cache import TokenizedSplit, token_dtype, tokenized_split
from .tokenization import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "SPLITS",
    "ByteTokenizer",
    "CorpusNotFoundError",
    "DataError",
    "Document",
    "HFTokenizer",
    "PreparedData",
    "Source",
    "TokenDataset",
    "TokenizedSplit",
    "Tokenizer",
    "UnreadablePathError",
    "available_sources",
    "cache_dir",
    "corpora_dir",
    "get_source",
    "get_tokenizer",
    "hub_downloads",
    "iter_documents",
    "prepare_data",
    "register_source",
    "split_by_hash",
    "stable_unit_hash",
    "token_dtype",
    "tokenized_split",
]
