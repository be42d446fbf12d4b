r"""Random directions: isotropic or drawn from a preconditioned proposal.

Direction ``k`` of a run with seed ``s`` is generated from its own counter-based seeds, so it
is the same whatever order directions are evaluated in, on whichever process. The underlying
normal vector is made of chunks of :data:`CHUNK_SIZE` float32 entries, chunk ``c`` drawn from a
generator seeded by ``(s, k, c)``: a chunk can be regenerated on its own, which is how the
memory-light mode (:mod:`basin_volume.rays`) avoids ever holding a whole direction.

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

__all__ = ["CHUNK_SIZE", "Direction", "direction_seed", "normal_chunks", "sample_direction"]

CHUNK_SIZE = 1 << 18


def direction_seed(seed: int, index: int, chunk: int = 0) -> int:
    """A 63-bit seed for chunk ``chunk`` of direction ``index`` of a run seeded with ``seed``.

    Mixed through :class:`numpy.random.SeedSequence`, so neighbouring seeds, indices and chunks
    give unrelated streams.
    """
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(index), int(chunk)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def normal_chunks(seed: int, index: int, dim: int, *, device="cpu"):
    """Yield ``(start, z_chunk)``: the standard normal vector of direction ``index`` in chunks.

    Each chunk is float32 on ``device``. The values depend on the device's generator: CPU
    chunks are the reference used everywhere unless a run asks for on-device generation.
    """
    for c, start in enumerate(range(0, dim, CHUNK_SIZE)):
        gen = torch.Generator(device=device).manual_seed(direction_seed(seed, index, c))
        size = min(CHUNK_SIZE, dim - start)
        yield start, torch.randn(size, generator=gen, dtype=torch.float32, device=device)


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

    The underlying normal vector is drawn on the CPU (see :func:`normal_chunks`), so a
    direction does not depend on the device the model lives on.
    """
    z = torch.cat([chunk for _, chunk in normal_chunks(seed, index, dim)]).double()
    z_norm = torch.linalg.vector_norm(z)
    if preconditioner is None:
        return Direction((z / z_norm).to(device), 1.0)
    v = preconditioner.apply(z)
    v_norm = torch.linalg.vector_norm(v)
    return Direction((v / v_norm).to(device), float(v_norm / z_norm))
