r"""Random directions: isotropic or drawn from a preconditioned proposal.

Direction ``k`` of a run with seed ``s`` is generated from its own counter-based seed, so it
is the same whatever order directions are evaluated in, on whichever process.

With :math:`z \sim N(0, I_D)`, :math:`u = z/\lVert z\rVert` is uniform on the sphere and the
proposal is :math:`\omega = Pu/\lVert Pu\rVert` for a positive-definite preconditioner
:math:`P` with :math:`\det P = 1`. This angular central Gaussian has density
:math:`q(\omega) = \lVert Pu\rVert^{D}` relative to the uniform distribution on the sphere,
so each direction is reweighted by :math:`\lVert Pu\rVert^{-D}`; ``prop`` below is
:math:`\lVert Pu\rVert` (1 without a preconditioner).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .preconditioners import Preconditioner

__all__ = ["Direction", "direction_seed", "sample_direction"]


def direction_seed(seed: int, index: int) -> int:
    """A 63-bit seed for direction ``index`` of a run seeded with ``seed``.

    Mixed through :class:`numpy.random.SeedSequence`, so neighbouring seeds and indices give
    unrelated streams.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class Direction:
    """One sampled direction.

    Attributes
    ----------
    omega : torch.Tensor
        Unit vector, float64, on the requested device.
    prop : float
        :math:`\\lVert Pu\\rVert` for the unit vector :math:`u` it was drawn from.
    """

    omega: torch.Tensor
    prop: float


def sample_direction(
    index: int,
    dim: int,
    *,
    seed: int,
    preconditioner: Preconditioner | None = None,
    device: torch.device | str | None = None,
) -> Direction:
    """Draw direction ``index`` of a run seeded with ``seed``.

    The underlying normal vector is drawn on the CPU in float64, so a direction does not depend
    on the device the model lives on.
    """
    gen = torch.Generator(device="cpu").manual_seed(direction_seed(seed, index))
    z = torch.randn(dim, generator=gen, dtype=torch.float64)
    z_norm = torch.linalg.vector_norm(z)
    if preconditioner is None:
        return Direction((z / z_norm).to(device), 1.0)
    v = preconditioner.apply(z)
    v_norm = torch.linalg.vector_norm(v)
    return Direction((v / v_norm).to(device), float(v_norm / z_norm))
