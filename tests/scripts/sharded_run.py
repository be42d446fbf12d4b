"""Run under torchrun: a sharded estimate; rank 0 saves it. Optionally one rank fails."""

import sys
import warnings

import torch

import basin_volume as bv


def problem():
    torch.manual_seed(0)
    dim = 30
    center = torch.randn(dim, dtype=torch.float64)
    h = torch.linspace(0.5, 4.0, dim, dtype=torch.float64)

    def fn(th):
        d = th - center
        return 0.5 * (h * d * d).sum() + 0.3 * (d**3).sum()

    return fn, center


def main(out, fail_rank=None):
    fn, center = problem()
    calls = []

    def maybe_failing(th):
        calls.append(1)
        import torch.distributed as dist

        if fail_rank is not None and dist.get_rank() == fail_rank and len(calls) > 30:
            raise RuntimeError(f"deliberate failure on rank {fail_rank}")
        return fn(th)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bv.estimate(maybe_failing, center, n_samples=40, seed=7, progress=False)
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_world_size() == 2
    if dist.get_rank() == 0:
        res.save(out)


def classifier_config():
    """A Fisher-preconditioned classifier run with batched directions."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    inputs = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    return bv.VolumeConfig(model_type="classifier", model=model, inputs=inputs, n_samples=24,
                           preconditioner_type="fisher", model_batch_size=3, seed=5,
                           progress=False)  # fmt: skip


def main_config(out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bv.VolumeEstimator.from_config(classifier_config()).run()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        res.save(out)


if __name__ == "__main__":
    if sys.argv[1] == "config":
        main_config(sys.argv[2])
    else:
        main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
