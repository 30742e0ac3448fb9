"""The randomized SVD engine against torch.svd_lowrank, the call PEFT's "pissa_niter_K" makes.

On the CPU it runs torch.svd_lowrank's own operations from the same Gaussian start, so it
gives the same bits. On a GPU it orthonormalizes by CholeskyQR2 instead of Householder QR;
that path is checked here on the CPU (the same code, `svd.cholesky_qr2`) against
torch.svd_lowrank with a tolerance: both run the same subspace iteration in float32 from the
same start, and the orthonormalizations' rounding (~1e-7 relative) is what the iteration
carries along. Singular values and the rank-q approximation U S V^T must agree within 1e-4 of
the largest singular value (about 1000 float32 ulps): far below any difference PiSSA can
see, far above rounding noise."""

from __future__ import annotations

import pytest
import torch
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from pissa_rs import svd
from pissa_rs.svd import gaussian_start, randomized_svd


def spectrum(rows, cols, decay, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (u * s) @ v.T


def torch_lowrank(a, q, niter, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.svd_lowrank(a, q=q, niter=niter)


def test_the_start_is_svd_lowranks_own():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        theirs = torch.randn(40, 7)
    assert torch.equal(gaussian_start(40, 7, 123, torch.device("cpu")), theirs)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(2, 90), cols=st.integers(2, 90), q_frac=st.floats(0.05, 1.0), niter=st.integers(0, 4),
       decay=st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]), seed=st.integers(0, 2**31))
def test_on_the_cpu_it_is_torch_svd_lowrank_bit_for_bit(rows, cols, q_frac, niter, decay, seed):
    a = spectrum(rows, cols, decay, seed)
    q = max(1, int(q_frac * min(rows, cols)))
    ours, theirs = randomized_svd(a, q, niter, seed), torch_lowrank(a, q, niter, seed)
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs))


def cholesky_qr2_throughout():
    """randomized_svd as it runs on a GPU: CholeskyQR2 orthonormalizes every basis."""
    return mock.patch.object(svd, "orthonormal_basis", svd.cholesky_qr2)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(2, 90), cols=st.integers(2, 90), q_frac=st.floats(0.05, 1.0), niter=st.integers(0, 4),
       decay=st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]), seed=st.integers(0, 2**31))
def test_with_cholesky_qr2_it_agrees_with_torch_svd_lowrank(rows, cols, q_frac, niter, decay, seed):
    a = spectrum(rows, cols, decay, seed)
    q = max(1, int(q_frac * min(rows, cols)))
    with cholesky_qr2_throughout():
        u, s, v = randomized_svd(a, q, niter, seed)
    tu, ts, tv = torch_lowrank(a, q, niter, seed)
    assert u.shape == tu.shape and s.shape == ts.shape and v.shape == tv.shape
    scale = ts[0].item() + 1e-30
    assert (s - ts).abs().max().item() <= 1e-4 * scale
    assert ((u * s) @ v.T - (tu * ts) @ tv.T).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("decay", [0.3, 1.0, 4.0])
def test_with_cholesky_qr2_at_least_as_accurate_as_svd_lowrank(decay):
    """CholeskyQR2's path: energy kept and orthogonality of U and V, on gentle and on very ill-conditioned spectra
    (k**-4: the sketch's condition number is far past what Cholesky takes in float32)."""
    a = spectrum(400, 300, decay, 1)
    with cholesky_qr2_throughout():
        u, s, v = randomized_svd(a, 32, 2, 7)
    tu, ts, tv = torch_lowrank(a, 32, 2, 7)
    total = a.square().sum().item()
    assert s.square().sum().item() / total >= ts.square().sum().item() / total - 1e-6
    eye = torch.eye(32)
    for ours, theirs in ((u, tu), (v, tv)):
        assert (ours.T @ ours - eye).abs().max().item() <= max(2e-6, 2 * (theirs.T @ theirs - eye).abs().max().item())


def test_cholesky_where_it_is_safe_householder_where_it_is_not(monkeypatch):
    gentle, steep = spectrum(200, 100, 0.3, 0), spectrum(200, 100, 4.0, 0)
    calls = []
    householder = torch.linalg.qr
    monkeypatch.setattr(svd.torch.linalg, "qr", lambda x: calls.append(x.shape) or householder(x))
    with cholesky_qr2_throughout():
        randomized_svd(gentle, 16, 2, 0)
        assert calls == []  # a well-conditioned sketch: CholeskyQR2 throughout
        randomized_svd(steep, 16, 2, 0)
        assert calls  # a sketch too ill-conditioned for float32 Cholesky: Householder
        zero = randomized_svd(torch.zeros(30, 20), 4, 1, 0)
        assert zero[1].abs().max().item() == 0.0 and torch.isfinite(zero[0]).all()


def test_each_device_orthonormalizes_its_own_way(monkeypatch):
    """Householder QR for a CPU tensor (svd_lowrank's bits), CholeskyQR2 for any other."""
    taken = []
    monkeypatch.setattr(svd, "cholesky_qr2", lambda x: taken.append(x.device.type) or x)
    randomized_svd(spectrum(60, 40, 1.0, 0), 8, 3, 0)
    assert taken == []
    svd.orthonormal_basis(torch.empty(6, 2, device="meta"))
    assert taken == ["meta"]


def test_the_same_seed_gives_the_same_bytes_in_concurrent_threads():
    """No global generator: threads need no lock to get their own random start."""
    from concurrent.futures import ThreadPoolExecutor

    weights = [spectrum(96, 64, 0.5, k) for k in range(12)]
    alone = [randomized_svd(w, 8, 1, k)[0] for k, w in enumerate(weights)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda k: randomized_svd(weights[k], 8, 1, k)[0], range(len(weights))))
    assert all(torch.equal(x, y) for x, y in zip(alone, together))


def test_full_svds_on_cuda_take_gesvd_and_the_cpu_its_only_driver(monkeypatch):
    """torch's CUDA default (gesvdj) may lose precision on ill-conditioned matrices (torch's
    docs); every full SVD of ours asks for gesvd there. Seen through a stand-in tensor whose
    device says cuda, since this machine may have none."""
    from unittest import mock

    from pissa_rs import svd

    calls = []
    monkeypatch.setattr(svd.torch.linalg, "svd", lambda a, **kw: calls.append(("svd", kw)) or (a, a, a))
    monkeypatch.setattr(svd.torch.linalg, "svdvals", lambda a, **kw: calls.append(("svdvals", kw)) or a)
    on_gpu = mock.Mock(device=torch.device("cuda", 0))
    svd.full_svd(on_gpu)
    svd.singular_values(on_gpu)
    on_cpu = mock.Mock(device=torch.device("cpu"))
    svd.full_svd(on_cpu)
    assert calls == [("svd", {"full_matrices": False, "driver": "gesvd"}), ("svdvals", {"driver": "gesvd"}),
                     ("svd", {"full_matrices": False, "driver": None})]
