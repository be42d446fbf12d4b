"""The basin during training, in a plain PyTorch loop (no Trainer).

Trains a small MLP on sklearn's bundled digits with a hand-written loop and, every 100
steps, estimates the loss basin of the live model on a held-out DataLoader with
``basin_volume.callbacks.estimate_live``. The measurement leaves the model, its gradients and
the global random state exactly as they were, so training continues as if it had not
happened. Under a minute on two CPU cores::

    python examples/training_loop.py
"""

import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import basin_volume as bv
from basin_volume.callbacks import estimate_live


def main(steps: int = 400, every: int = 100) -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    train = DataLoader(TensorDataset(x[:1200], y[:1200]), batch_size=64, shuffle=True)
    held_out = DataLoader(TensorDataset(x[1200:], y[1200:]), batch_size=256)  # not shuffled

    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = bv.VolumeConfig(
        model_type="classifier",
        inputs=held_out,  # streamed, one batch at a time; labels from the (x, y) batches
        basin="loss",  # delta = cross-entropy(theta) - cross-entropy(theta0)
        cutoff=0.05,
        n_samples=20,
        method="is",  # quick enough for every 100 steps; method="smc" for a number to quote
        preconditioner_type="adam",  # the live optimizer's second moments
        preconditioner_eps="prior",  # no direction stretched past the prior's reach
        progress=False,
    )

    history = []
    step = 0
    while step < steps:
        for xb, yb in train:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % every == 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", bv.LowESSWarning)
                    result = estimate_live(config, model, optimizer=opt, step=step)
                history.append((step, result.log_volume, result.ess))
                print(
                    f"step {step:4d}  train loss {loss.item():.3f}  "
                    f"log P(loss basin) {result.log_volume:9.1f} nats  ESS {result.ess:.1f}"
                )
            if step == steps:
                break
    return history


if __name__ == "__main__":
    main()
