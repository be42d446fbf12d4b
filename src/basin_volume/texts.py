"""Validation texts for a causal LM: iterating a data set, tokenising, chunking into sequences."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

# --------------------------------------------------------------------------- texts


def _dataset_len(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def iter_texts(dataset, text_key: str = "text") -> Iterator[str]:
    """The texts of ``dataset`` in order, reading nothing beyond what is consumed.

    ``dataset`` may be a ``datasets.Dataset`` or ``IterableDataset``, a mapping of columns
    (``{"text": [...]}``), a sequence of mappings (``[{"text": ...}, ...]``), or a sequence of
    strings (``text_key`` is then unused).
    """
    if dataset is None:
        raise ValueError(
            "dataset is required: pass a data set of texts, e.g. "
            "datasets.Dataset.from_dict({'text': [...]})"
        )
    if isinstance(dataset, str | bytes):
        raise TypeError(
            "dataset must be a collection of texts, not a single string; "
            "wrap it in a list: dataset=[text]"
        )
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, Mapping):  # a DatasetDict
        raise ValueError(
            f"dataset is a dict of splits {sorted(columns)}; pass one split, e.g. "
            f"dataset=dataset[{next(iter(columns))!r}]"
        )
    if isinstance(dataset, Mapping):
        if text_key not in dataset:
            raise ValueError(
                f"text_key={text_key!r} is not a column of dataset (columns: "
                f"{sorted(map(str, dataset))}); pass text_key=<the column holding the text>"
            )
        rows: Iterable = dataset[text_key]
    elif columns is not None:
        if columns and text_key not in columns:
            raise ValueError(
                f"text_key={text_key!r} is not a column of dataset (columns: {columns}); "
                "pass text_key=<the column holding the text>"
            )
        select = getattr(dataset, "select_columns", None)
        rows = (r[text_key] for r in (select([text_key]) if select else dataset))
    else:
        rows = dataset
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            if text_key not in row:
                raise ValueError(
                    f"text_key={text_key!r} is not a field of dataset row {i} (fields: "
                    f"{sorted(map(str, row))}); pass text_key=<the field holding the text>"
                )
            row = row[text_key]
        if not isinstance(row, str):
            raise TypeError(
                f"dataset row {i} ({text_key!r}) is a {type(row).__name__}, not a string; "
                "the causal KL needs raw text (pass text_key=<a text column>)"
            )
        yield row


def _first_texts(dataset, text_key: str, n: int) -> list[str]:
    """The first ``n`` texts; for a ``datasets.Dataset`` only those rows are read."""
    select = getattr(dataset, "select", None)
    size = _dataset_len(dataset)
    if callable(select) and size is not None and not isinstance(dataset, Mapping):
        dataset = select(range(min(n, size)))
    return list(itertools.islice(iter_texts(dataset, text_key), n))


def _pad_id(tokenizer, *, warn: bool) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    eos = getattr(tokenizer, "eos_token_id", None)
    fill, name = (int(eos), f"the eos token id {eos}") if eos is not None else (0, "token id 0")
    if warn:
        warnings.warn(
            f"tokenizer has no pad token; padding with {name}. Padded positions are excluded "
            "by the attention mask, so this does not change the result; set "
            "tokenizer.pad_token (e.g. = tokenizer.eos_token) to silence this warning",
            UserWarning,
            stacklevel=3,
        )
    return fill


def _encode(tokenizer, texts: list[str], **kwargs) -> list[list[int]]:
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(
            "tokenizer is required for a causal LM: pass the model's tokenizer, e.g. "
            "tokenizer=AutoTokenizer.from_pretrained(<model name>)"
        )
    out = tokenizer(texts, **kwargs)
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    return [list(map(int, seq)) for seq in ids]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_budget(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(
            f"cache_budget_bytes must be None or a non-negative int (bytes), got {value!r}"
        )


def tokenize_texts(
    texts: Sequence[str], tokenizer, *, max_seq_len: int = 2048
) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` (truncated to ``max_seq_len`` tokens) and right-pad them.

    Texts that produce no tokens are dropped. A tokenizer without a pad token pads with its
    eos token (with a warning); padded positions have ``attention_mask == 0``.

    Returns
    -------
    dict
        ``input_ids`` and ``attention_mask``, int64 tensors of shape ``[n, longest]``.
    """
    _check_positive_int("max_seq_len", max_seq_len)
    seqs = _encode(tokenizer, list(texts), truncation=True, max_length=max_seq_len, padding=False)
    seqs = [s[:max_seq_len] for s in seqs if s]
    if not seqs:
        raise ValueError("dataset texts produced no tokens: pass non-empty texts")
    longest = max(map(len, seqs))
    pad = _pad_id(tokenizer, warn=any(len(s) < longest for s in seqs))
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def chunk_and_tokenize(
    dataset,
    tokenizer,
    *,
    text_key: str = "text",
    max_seq_len: int = 2048,
    n_chunks: int | None = None,
    eos_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Join texts with an end-of-sequence token and cut them into chunks of ``max_seq_len``.

    Each text is tokenised without special tokens and followed by ``eos_token_id`` (default:
    the tokenizer's), the token stream is cut into consecutive chunks of exactly
    ``max_seq_len`` tokens, and the incomplete tail is dropped. Texts are read only until
    ``n_chunks`` chunks are full, so a large data set is not tokenised in full.

    Parameters
    ----------
    dataset
        Texts, in any form :func:`iter_texts` accepts (e.g. a ``datasets.Dataset``).
    tokenizer
        A Hugging Face tokenizer.
    text_key : str
        The text column.
    max_seq_len : int
        Tokens per chunk.
    n_chunks : int, optional
        Stop after this many chunks (default: use every text).
    eos_token_id : int, optional
        The separator (default: ``tokenizer.eos_token_id``).

    Returns
    -------
    dict
        ``input_ids`` (int64, ``[n, max_seq_len]``) and an all-ones ``attention_mask``.
    """
    _check_positive_int("max_seq_len", max_seq_len)
    if n_chunks is not None:
        _check_positive_int("n_chunks", n_chunks)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            raise ValueError(
                "chunking joins texts with the end-of-sequence token, but the tokenizer has "
                "no eos_token; set tokenizer.eos_token or pass eos_token_id=<id>"
            )
    need = math.inf if n_chunks is None else n_chunks * max_seq_len
    stream: list[int] = []
    for text in iter_texts(dataset, text_key):
        if len(stream) >= need:
            break
        (ids,) = _encode(tokenizer, [text], add_special_tokens=False, verbose=False)
        stream.extend(ids)
        stream.append(int(eos_token_id))
    count = len(stream) // max_seq_len
    if n_chunks is not None:
        count = min(count, n_chunks)
    if count == 0:
        raise ValueError(
            f"the dataset has only {len(stream)} tokens, fewer than one chunk of "
            f"max_seq_len={max_seq_len}; lower max_seq_len or use chunking=False"
        )
    if n_chunks is not None and count < n_chunks:
        warnings.warn(
            f"the dataset gives only {count} full chunks of {max_seq_len} tokens, fewer than "
            f"the {n_chunks} asked for (val_size); using {count}",
            UserWarning,
            stacklevel=2,
        )
    ids = torch.tensor(stream[: count * max_seq_len], dtype=torch.long).view(count, max_seq_len)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
