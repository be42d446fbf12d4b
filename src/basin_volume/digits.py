"""The paper's small model: a GELU MLP on scikit-learn's bundled 8x8 digits.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn. Training is
full-batch Adam and takes about a second on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DigitsRun", "load_digits_tensors", "make_digits_mlp", "train_digits_mlp"]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float32 inputs in [0, 1] (shape [1797, 64]) and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (
        torch.tensor(data.data, dtype=torch.float32) / 16.0,
        torch.tensor(data.target, dtype=torch.int64),
    )


def make_digits_mlp(hidden: int = 64, *, seed: int = 0) -> nn.Sequential:
    """64 -> hidden (GELU) -> 10, initialised with PyTorch's default under ``seed``."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 10))
    finally:
        torch.random.set_rng_state(gen_state)


@dataclass(frozen=True, eq=False)
class DigitsRun:
    """A trained digits MLP with its optimizer and data.

    Attributes
    ----------
    model : torch.nn.Sequential
        The trained network (eval mode).
    optimizer : torch.optim.Adam
        The optimizer after training (its ``exp_avg_sq`` feeds Adam preconditioners).
    train_inputs, train_labels : torch.Tensor
        The training examples (including any poisoned ones).
    test_inputs, test_labels : torch.Tensor
        The held-out digits.
    accuracy : float
        Test accuracy.
    clean_inputs, clean_labels : torch.Tensor
        The training examples without the poisoned ones (equal to ``train_*`` if none).
    checkpoints : dict
        ``{step: state_dict}`` copies of the parameters at the requested steps.
    """

    model: nn.Sequential
    optimizer: torch.optim.Adam
    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    accuracy: float
    clean_inputs: torch.Tensor
    clean_labels: torch.Tensor
    checkpoints: dict


def train_digits_mlp(
    *,
    n_train: int = 1024,
    hidden: int = 64,
    steps: int = 1000,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    n_poison: int = 0,
    checkpoint_steps: tuple[int, ...] = (),
) -> DigitsRun:
    r"""Train the digits MLP with full-batch Adam and an L2 penalty.

    The loss is cross-entropy plus :math:`\tfrac{\lambda}{2}\lVert\theta\rVert^2` with
    :math:`\lambda` = ``weight_decay`` (Adam's coupled weight decay), so the matching prior is
    :math:`N(0, \sigma^2 I)` with :math:`\sigma^2 = 1/(\lambda N)` per example.

    Parameters
    ----------
    n_train : int
        Training examples, drawn at random (with ``seed``) from the 1797 digits; the rest
        are the test set.
    hidden : int
        Hidden width.
    steps : int
        Full-batch Adam steps.
    lr, weight_decay : float
        Adam's settings.
    seed : int
        Seeds the split, the initialisation and the poisoned labels.
    n_poison : int
        Extra training examples, taken from the held-out digits, given a wrong label drawn at
        random: the network has to memorise them.
    checkpoint_steps : tuple of int
        Steps (0 = the initialisation, ``steps`` = the end) at which to keep a copy of the
        parameters in ``checkpoints``.
    """
    inputs, labels = load_digits_tensors()
    if not 0 < n_train < len(inputs):
        raise ValueError(f"n_train must be in [1, {len(inputs) - 1}], got {n_train}")
    if not 0 <= n_poison < len(inputs) - n_train:
        raise ValueError(f"n_poison must be in [0, {len(inputs) - n_train - 1}], got {n_poison}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(inputs), generator=gen)
    train, poison, test = (
        perm[:n_train],
        perm[n_train : n_train + n_poison],
        perm[n_train + n_poison :],
    )
    wrong = (labels[poison] + torch.randint(1, 10, (n_poison,), generator=gen)) % 10
    x_train = torch.cat([inputs[train], inputs[poison]])
    y_train = torch.cat([labels[train], wrong])
    model = make_digits_mlp(hidden, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    checkpoints = {}
    for step in range(steps + 1):
        if step in checkpoint_steps:
            checkpoints[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x_train), y_train).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(inputs[test]).argmax(-1) == labels[test]).float().mean())
    return DigitsRun(
        model,
        opt,
        x_train,
        y_train,
        inputs[test],
        labels[test],
        accuracy,
        inputs[train],
        labels[train],
        checkpoints,
    )
