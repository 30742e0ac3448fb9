"""Randomized SVD: the math of torch.svd_lowrank (Halko et al.'s subspace iteration,
PEFT's "pissa_niter_K"), from a seeded Gaussian start drawn on the CPU and moved to the
device, so that a seed gives the same start on every device and GPU model (CUDA's
randn depends on the GPU's SM count), and no global generator is touched. The bases
are orthonormalized on the CPU by Householder QR, as torch.svd_lowrank does, so that
there the result is svd_lowrank's (PEFT's) bit for bit; on a GPU by CholeskyQR2 (a few
large matmuls; Householder QR on a GPU is latency-bound), falling back to Householder QR
when the sketch is too ill-conditioned for Cholesky in float32."""

from __future__ import annotations

import torch

# cuSOLVER's driver for full SVDs. torch's default on CUDA is gesvdj (Jacobi), which torch's
# documentation says may lose precision on ill-conditioned matrices: trained weights are
# (their spectra decay over orders of magnitude), and MiLoRA, MiCA and CorDA-KPM take the
# bottom of the spectrum, where that loss lands. gesvd is LAPACK's QR-based algorithm, the
# one the CPU runs. The CPU has one driver (None).
CUDA_FULL_SVD_DRIVER = "gesvd"


def svd_driver(device: torch.device) -> str | None:
    """The driver a full SVD on `device` uses: gesvd on CUDA, the only one elsewhere."""
    return CUDA_FULL_SVD_DRIVER if device.type == "cuda" else None


def full_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(a, full_matrices=False) with this project's driver (svd_driver)."""
    return torch.linalg.svd(a, full_matrices=False, driver=svd_driver(a.device))


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """torch.linalg.svdvals(a) with this project's driver (svd_driver)."""
    return torch.linalg.svdvals(a, driver=svd_driver(a.device))


# CholeskyQR2 keeps orthogonality to float32 rounding while the sketch's condition number
# stays well under u**-1/2 (~3e3 in float32); the ratio of the Cholesky factor's diagonal
# entries bounds it from below.
MAX_CHOLESKY_CONDITION = 1e3


def orthonormal_basis(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of x's columns (m x k, m >= k): Householder QR on the CPU,
    CholeskyQR2 elsewhere."""
    return torch.linalg.qr(x).Q if x.device.type == "cpu" else cholesky_qr2(x)


def cholesky_qr2(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of x's columns by CholeskyQR2, or Householder QR when the Gram
    matrix is not safely positive definite."""
    q = x
    for _ in range(2):
        gram = q.mT @ q
        factor, info = torch.linalg.cholesky_ex(gram)
        diagonal = factor.diagonal()
        if info.item() != 0 or not torch.isfinite(diagonal).all() or \
                (diagonal.max() > MAX_CHOLESKY_CONDITION * diagonal.min()).item():
            return torch.linalg.qr(x).Q
        q = torch.linalg.solve_triangular(factor, q.mT, upper=False).mT  # q @ factor^-T
    return q


def gaussian_start(cols: int, q: int, seed: int | None, device: torch.device) -> torch.Tensor:
    """torch.svd_lowrank's start, torch.randn(cols, q), from a generator seeded with `seed`
    on the CPU (the global CPU generator when seed is None), moved to `device`."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(cols, q, generator=generator, dtype=torch.float32).to(device)


def randomized_svd(a: torch.Tensor, q: int, niter: int, seed: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) with a ~= U diag(S) V^T, rank q, as torch.svd_lowrank(a, q, niter) computes
    them after torch.manual_seed(seed) on the CPU: the same start, the same alternation (on
    the CPU the same operations, so the same bits)."""
    m, n = a.shape
    tall = a if m >= n else a.mT  # svd_lowrank works on the tall orientation
    basis = orthonormal_basis(tall @ gaussian_start(tall.shape[1], q, seed, a.device))
    for _ in range(niter):
        basis = orthonormal_basis(tall.mT @ basis)
        basis = orthonormal_basis(tall @ basis)
    u, s, vh = full_svd(basis.mT @ tall)
    u, v = basis @ u, vh.mT
    return (u, s, v) if m >= n else (v, s, u)
