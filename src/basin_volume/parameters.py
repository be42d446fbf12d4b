"""A model's parameters as one flat vector, without ever writing into the model.

:class:`FlatParameters` maps a 1-D tensor ``theta`` (in ``parameters_to_vector`` order of the
selected parameters) to a ``{name: view}`` dictionary for :func:`torch.func.functional_call`,
so evaluating the model at ``theta`` leaves the model's own tensors untouched.
:func:`select_parameters` says which parameters make up the vector: by default the trainable
ones (``requires_grad=True``); frozen ones keep their values. :func:`preserved` restores the
train/eval flags of every submodule, whatever happens inside it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "FlatParameters",
    "ParameterSelection",
    "center_sha256",
    "describe_selection",
    "preserved",
    "select_parameters",
]

ParameterSelection = str | Sequence[str] | Callable[[str, nn.Parameter], bool]
"""Which parameters make up the basin's coordinates: ``"trainable"`` (``requires_grad``),
``"all"``, a list of names from ``model.named_parameters()`` or glob patterns over them
(``"transformer.h.*.mlp.*"``), or a predicate ``(name, parameter) -> bool``."""

_GLOB = frozenset("*?[")

_HASH_CHUNK = 1 << 22


def select_parameters(
    model: nn.Module, parameters: ParameterSelection = "trainable"
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs a selection picks, in ``model.named_parameters()`` order.

    Parameters
    ----------
    model : torch.nn.Module
    parameters : "trainable", "all", list of str, or callable
        ``"trainable"`` (default): those with ``requires_grad=True`` (frozen ones keep their
        values and are not counted in ``D``); ``"all"``; a list of names from
        ``model.named_parameters()`` and/or glob patterns over them (:mod:`fnmatch`, case
        sensitive; ``*`` also matches dots, so ``"transformer.h.*.mlp.*"`` selects every
        layer's MLP); or a predicate ``(name, parameter) -> bool``. A list selects
        parameters whether or not they are trainable.

    Returns
    -------
    list of (str, torch.nn.Parameter)

    Raises
    ------
    ValueError
        When the selection is not one of these, has a name or pattern that matches no
        parameter, or selects none.
    """
    named = list(model.named_parameters())
    if not named:
        raise ValueError("model has no parameters: there is no basin to measure")
    if isinstance(parameters, str):
        if parameters not in ("trainable", "all"):
            raise ValueError(
                "parameters must be 'trainable', 'all', a list of parameter names or a "
                f"function (name, parameter) -> bool; got {parameters!r}"
            )
        chosen = named if parameters == "all" else [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "model has no trainable parameters (requires_grad is False for all of them); "
                "pass parameters='all' to measure the basin of all of them, or a list of names"
            )
        return chosen
    if callable(parameters):
        chosen = [(n, p) for n, p in named if parameters(n, p)]
    elif isinstance(parameters, Sequence) and all(isinstance(n, str) for n in parameters):
        names = [n for n, _ in named]
        known = set(names)
        wanted: set[str] = set()
        unknown = []
        for entry in parameters:
            if entry in known:
                wanted.add(entry)
            elif _GLOB & set(entry) and (
                hits := [n for n in names if fnmatch.fnmatchcase(n, entry)]
            ):
                wanted.update(hits)
            else:
                unknown.append(entry)
        if unknown:
            raise ValueError(
                f"parameters has names or patterns {unknown[:3]} that match none of the "
                f"model's parameters; use names from model.named_parameters() or glob "
                f"patterns over them, e.g. {names[:3]}"
            )
        chosen = [(n, p) for n, p in named if n in wanted]
    else:
        raise ValueError(
            "parameters must be 'trainable', 'all', a list of parameter names or a function "
            f"(name, parameter) -> bool; got {type(parameters).__name__}"
        )
    if not chosen:
        raise ValueError("parameters selects none of the model's parameters: select at least one")
    return chosen


def describe_selection(parameters: ParameterSelection) -> str:
    """``"trainable"``, ``"all"``, ``"names"`` or ``"predicate"``: how a selection was made."""
    if isinstance(parameters, str):
        return parameters
    return "predicate" if callable(parameters) else "names"


class FlatParameters:
    """The selected (by default the trainable) parameters of ``model`` as one flat vector.

    Shared (tied) parameters appear once, as in ``model.parameters()``. Parameters left out
    (frozen ones, by default) keep their values in every evaluation.

    Parameters
    ----------
    model : torch.nn.Module
    parameters : "trainable", "all", list of str, or callable
        Which parameters make up the vector (see :func:`select_parameters`).
    compile : bool or dict, optional
        Evaluate the model through :func:`torch.compile` (``True``, or a dict of its keyword
        arguments such as ``{"mode": "max-autotune"}``). Compiled kernels may round
        differently from eager ones, so estimates agree to float precision, not bit for
        bit. Batched evaluations (several directions in one :func:`torch.func.vmap` call)
        run eagerly, since compiled code cannot run under ``vmap``. Off by default:
        compiling costs seconds to minutes up front and pays off for large models on GPUs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool | dict | None = None,
        parameters: ParameterSelection = "trainable",
    ):
        self.model = model
        named = select_parameters(model, parameters)
        self.named = named
        self.selection = describe_selection(parameters)
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.dim = sum(self.numels)
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"all parameters must share one dtype and device, found {dtypes} on {devices}; "
                "cast the model first (e.g. model.to(torch.float32))"
            )
        self.dtype = dtypes.pop()
        self.device = devices.pop()
        if self.device.type == "meta":
            raise ValueError(
                "the model's parameters are on the meta device, which holds shapes but no "
                "values (built with device='meta' or init_empty_weights); load its weights "
                "first, e.g. model.to_empty(device='cpu') then model.load_state_dict(...)"
            )
        self._model_call, self._functional_call = model, _functional
        options = compile_options(compile)
        if options is not None:
            self._model_call = torch.compile(model, **options)
            self._functional_call = torch.compile(_functional, **options)

    def center(self) -> torch.Tensor:
        """A detached copy of the current (selected) parameters as one vector."""
        return torch.cat([p.detach().reshape(-1) for _, p in self.named])

    def as_dict(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta`` shaped like the model's parameters, keyed by name."""
        return {
            name: chunk.view(shape)
            for name, chunk, shape in zip(
                self.names, theta.split(self.numels), self.shapes, strict=True
            )
        }

    def call(self, theta: torch.Tensor | None, *args, **kwargs):
        """``model(*args, **kwargs)`` evaluated with parameters ``theta``.

        ``theta=None`` uses the parameters currently in the model (the memory-light mode of
        :class:`basin_volume.rays.InPlaceRays` writes them in place).
        """
        if theta is None:
            return self._model_call(*args, **kwargs)
        if _is_batched(theta):  # under torch.func.vmap, which compiled code cannot enter
            return _functional(self.model, self.as_dict(theta), args, kwargs)
        return self._functional_call(self.model, self.as_dict(theta), args, kwargs)


def compile_options(compile: bool | dict | None) -> dict | None:
    """The :func:`torch.compile` arguments a ``compile`` setting asks for (``None``: off)."""
    if compile is None or compile is False:
        return None
    if not (compile is True or isinstance(compile, dict)):
        raise TypeError(
            f"compile must be True, False or a dict of torch.compile arguments, got {compile!r}"
        )
    return {} if compile is True else dict(compile)


def _functional(model: nn.Module, params: dict, args: tuple, kwargs: dict):
    return functional_call(model, params, args, kwargs)


def _is_batched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a :func:`torch.func.vmap` batch (the level API is private)."""
    return bool(torch._C._functorch.is_batchedtensor(tensor))


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, restoring every submodule's mode on exit (also on errors
    and KeyboardInterrupt)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def center_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the bytes of ``tensors`` (in order) with their dtypes and total size.

    The concatenation is never made: a large model is hashed chunk by chunk. The digest is the
    ``center_sha256`` of a run log's settings (:mod:`basin_volume.runfile`), so a result from
    :func:`basin_volume.estimate` and one from a results file can be compared.
    """
    digest = hashlib.sha256()
    dim, dtypes = 0, set()
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        dim += flat.numel()
        dtypes.add(str(flat.dtype))
        for chunk in flat.split(_HASH_CHUNK):
            digest.update(chunk.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    digest.update(f"{sorted(dtypes)}:{dim}".encode())
    return digest.hexdigest()
