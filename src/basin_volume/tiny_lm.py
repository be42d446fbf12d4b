r"""A tiny offline causal language model for tests, examples and the demo.

Nothing is downloaded. The text is Python's own documentation, shipped with every CPython as
:mod:`pydoc_data.topics`; a byte-level BPE tokenizer is trained on it with the
``tokenizers`` library and a two-layer GPT-NeoX (the Pythia architecture) is trained briefly
on it with AdamW, minimising the next-token cross-entropy

.. math:: L(\theta) = -\frac{1}{N}\sum_{i}\log p_\theta(x_{i+1}\mid x_{\le i}).

Both are written with ``save_pretrained`` to a directory, so the result loads with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` like any hub
model. Like Pythia's, the tokenizer has an end-of-text token and no pad token.

The topics are split deterministically: every :data:`HELD_OUT_EVERY`-th topic (in sorted
order) is held out from training and served by :func:`tiny_lm_texts`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "EOS_TOKEN",
    "HELD_OUT_EVERY",
    "build_tiny_lm",
    "default_tiny_lm_path",
    "load_tiny_lm",
    "tiny_lm_texts",
]

EOS_TOKEN = "<|endoftext|>"
HELD_OUT_EVERY = 8
_MARKER = "basin_volume_tiny_lm.json"
_FORMAT = 1


def _topic_texts(split: str) -> list[str]:
    from pydoc_data.topics import topics

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    keys = sorted(topics)
    held = {k for i, k in enumerate(keys) if i % HELD_OUT_EVERY == 0}
    chosen = [k for k in keys if (k in held) == (split == "validation")]
    return [topics[k] for k in chosen]


def tiny_lm_texts(n: int | None = None, *, split: str = "validation", min_chars: int = 40):
    """Paragraphs of Python's documentation as a ``datasets.Dataset`` with a ``"text"`` column.

    Parameters
    ----------
    n : int, optional
        Keep the first ``n`` paragraphs (default: all of them).
    split : {"validation", "train"}
        ``"validation"``: the topics held out from the tiny model's training.
    min_chars : int
        Drop paragraphs shorter than this (headings, blank lines).

    Returns
    -------
    datasets.Dataset
        Built with ``Dataset.from_dict``; nothing is downloaded.
    """
    from datasets import Dataset

    paragraphs = [
        p.strip()
        for text in _topic_texts(split)
        for p in text.split("\n\n")
        if len(p.strip()) >= min_chars
    ]
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be a positive integer or None, got {n!r}")
        paragraphs = paragraphs[:n]
    return Dataset.from_dict({"text": paragraphs})


def default_tiny_lm_path(*, seed: int = 0, steps: int = 300) -> Path:
    """Where :func:`build_tiny_lm` caches the model when no path is given.

    ``$BASIN_VOLUME_CACHE`` if set, else ``$XDG_CACHE_HOME/basin_volume`` (default
    ``~/.cache/basin_volume``), with one sub-directory per setting.
    """
    root = os.environ.get("BASIN_VOLUME_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "basin_volume")
    return Path(root) / f"tiny-gpt-neox-v{_FORMAT}-seed{seed}-steps{steps}"


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=2048,
    )


def _train_model(tokenizer, texts, *, seed, steps, hidden, layers, heads, seq_len, batch, lr):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.long)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=2048,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        use_parallel_residual=True,
    )
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    finally:
        torch.random.set_rng_state(rng_state)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    # Ops this small run fastest on one thread (and many times slower on a busy machine
    # with several); restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loss = torch.tensor(math.nan)  # steps=0: the untrained initialisation
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
            x = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, float(loss.detach())


def build_tiny_lm(
    path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    steps: int = 300,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seq_len: int = 64,
    batch: int = 16,
    lr: float = 3e-3,
) -> Path:
    """Build (once) the tiny GPT-NeoX and its tokenizer in ``path``, and return ``path``.

    Idempotent: a directory already holding a model built with the same settings is returned
    as it is. The build happens in a temporary sibling directory that is renamed into place
    at the end, so an interrupted or concurrent build never leaves a half-written model.
    About 5 seconds on two CPU cores with the defaults.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Target directory (default: :func:`default_tiny_lm_path`).
    seed : int
        Seeds the initialisation and the training batches.
    steps : int
        AdamW steps on random windows of the training topics.
    vocab_size : int
        BPE vocabulary size, the 256 byte symbols and the end-of-text token included.
    hidden, layers, heads : int
        Width, depth and attention heads of the GPT-NeoX (MLP width ``4 * hidden``).
    seq_len, batch : int
        Training window length and windows per step.
    lr : float
        Peak learning rate (20 steps of linear warm-up).

    Returns
    -------
    pathlib.Path
        A directory for ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    settings = {
        "format": _FORMAT,
        "seed": seed,
        "steps": steps,
        "vocab_size": vocab_size,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "seq_len": seq_len,
        "batch": batch,
        "lr": lr,
    }
    path = Path(path) if path is not None else default_tiny_lm_path(seed=seed, steps=steps)
    marker = path / _MARKER
    if marker.exists():
        found = json.loads(marker.read_text())
        if found.get("settings") == settings:
            return path
        raise FileExistsError(
            f"{path} holds a tiny LM built with other settings ({found.get('settings')}); "
            "pass another path or delete that directory"
        )
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"{path} exists and is not a tiny-LM directory; pass an empty or new path"
        )
    texts = _topic_texts("train")
    tokenizer = _train_tokenizer(texts, vocab_size)
    model, loss = _train_model(
        tokenizer,
        texts,
        seed=seed,
        steps=steps,
        hidden=hidden,
        layers=layers,
        heads=heads,
        seq_len=seq_len,
        batch=batch,
        lr=lr,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"settings": settings, "final_train_loss": loss}, indent=1)
        )
        if path.exists():  # an empty directory
            path.rmdir()
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / _MARKER).exists():  # not just a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_tiny_lm(path: str | os.PathLike | None = None, **build_kwargs):
    """``(model, tokenizer)`` for the tiny LM, building it first if needed.

    The model is loaded in float32 and eval mode with ``AutoModelForCausalLM`` and the tokenizer
    with ``AutoTokenizer``, exactly as a hub model would be.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_lm(path, **build_kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
