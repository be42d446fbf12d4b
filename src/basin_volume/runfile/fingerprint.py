"""Fingerprints that tie a run log to its computation: centre, preconditioner, data, environment."""

from __future__ import annotations

import hashlib
import itertools
import math
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ..config import VolumeConfig

PROBE_SEED = 20240607
PROBE_RTOL = 1e-3
_CHUNK = 1 << 22


# ---------------------------------------------------------------------------- fingerprints
def _update(digest, tensor: torch.Tensor) -> None:
    for chunk in tensor.detach().reshape(-1).split(_CHUNK):
        digest.update(chunk.contiguous().cpu().view(torch.uint8).numpy().tobytes())


def _sha256(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tensor.dtype}:{tensor.numel()}:".encode())
    _update(digest, tensor)
    return digest.hexdigest()


def _center_stats(tensors: Iterable[torch.Tensor]) -> tuple[int, str, float]:
    """``(D, sha256 of the bytes, sum of squares in float64)``, streamed chunk by chunk so a
    large model is never copied whole."""
    digest = hashlib.sha256()
    dim, squares, dtypes = 0, 0.0, []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        dim += flat.numel()
        dtypes.append(str(flat.dtype))
        for chunk in flat.split(_CHUNK):
            digest.update(chunk.contiguous().cpu().view(torch.uint8).numpy().tobytes())
            squares += float(chunk.double().square().sum())
    digest.update(f"{sorted(set(dtypes))}:{dim}".encode())
    return dim, digest.hexdigest(), squares


def _preconditioner_fingerprint(pre: Any, dim: int) -> str | None:
    """A hash that changes when the proposal would: scales, or P applied to a fixed vector."""
    if pre is None:
        return None
    if isinstance(pre, torch.Tensor):
        return "scales:" + _sha256(pre)
    if hasattr(pre, "apply"):
        u = torch.randn(
            dim, generator=torch.Generator().manual_seed(PROBE_SEED), dtype=torch.float64
        )
        return f"{type(pre).__name__}:" + _sha256(pre.apply(u))
    return repr(pre)


def _texts(dataset: Any, text_key: str, limit: int) -> Iterator[str]:
    for item in itertools.islice(iter(dataset), limit):
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            yield str(item.get(text_key))
        else:
            yield repr(item)


def _data_fingerprint(cfg: VolumeConfig) -> str | None:
    """SHA-256 of the evaluation data: classifier inputs and/or the texts a language model
    reads (the first ``val_size``, or up to 100000 with chunking)."""
    digest, used = hashlib.sha256(), False
    if isinstance(cfg.inputs, torch.Tensor):
        digest.update(f"inputs:{cfg.inputs.dtype}:{list(cfg.inputs.shape)}:".encode())
        _update(digest, cfg.inputs)
        used = True
    elif cfg.inputs is not None:  # a DataLoader or batches
        from ..inputs import batches_sha256, is_batch_source

        if is_batch_source(cfg.inputs):
            digest.update(f"batches:{batches_sha256(cfg.inputs)}:".encode())
            used = True
    if getattr(cfg.basin, "value", cfg.basin) == "loss":  # KL runs keep their old digests
        digest.update(f"loss:{type(cfg.loss_fn).__name__}:".encode())
        if isinstance(cfg.labels, torch.Tensor):
            _update(digest, cfg.labels)
        used = True
    if cfg.dataset is not None:
        limit = 100_000 if cfg.chunking else int(cfg.val_size)
        try:
            for text in _texts(cfg.dataset, cfg.text_key, limit):
                digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        except TypeError:  # not iterable: its description is all there is
            digest.update(repr(cfg.dataset).encode())
        used = True
    return digest.hexdigest() if used else None


def _probe(fn: Callable, center: torch.Tensor) -> float:
    """``fn`` at one fixed point near the centre (1% of its norm away, direction fixed): the
    fingerprint of an objective that is only known as a function."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    step = torch.empty_like(center)
    for chunk in step.split(_CHUNK):
        chunk.copy_(torch.randn(chunk.numel(), generator=gen, dtype=torch.float32))
    norm = float(torch.linalg.vector_norm(center.detach().double()))
    scale = 1e-2 * (norm if norm > 0 else 1.0) / math.sqrt(center.numel())
    with torch.no_grad():
        value = fn(center.detach() + scale * step)
    if isinstance(value, torch.Tensor):
        value = value.detach().reshape(-1)[0].to("cpu", torch.float64)
    return float(value)


def _environment(device: torch.device | str) -> dict:
    from .. import __version__

    env = {
        "basin_volume": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    for name in ("numpy", "transformers", "datasets"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", "unknown")
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
    return env
