"""The PiSSA math on single matrices: reconstruction to half an ulp, kept energy, PEFT's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pissa_rs.factors import principal_factors, scaling, tensor_seed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    rows = draw(st.integers(1, 48))
    cols = draw(st.integers(1, 48))
    r = draw(st.integers(1, min(rows, cols)))
    dtype = draw(st.sampled_from(DTYPES))
    niter = draw(st.sampled_from([0, 0, 2, 4]))
    alpha = draw(st.sampled_from([r, 2 * r, 16, 1]))
    rslora = draw(st.booleans())
    fan_in_fan_out = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    return rows, cols, r, dtype, niter, alpha, rslora, fan_in_fan_out, seed, magnitude


def half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of x's dtype at each element of x, in float64."""
    finfo = torch.finfo(x.dtype)
    mag = x.to(torch.float64).abs()
    exponent = torch.floor(torch.log2(torch.clamp(mag, min=finfo.smallest_normal)))
    return torch.exp2(exponent) * finfo.eps / 2  # subnormals: clamped to the fixed smallest spacing


@settings(max_examples=150, deadline=None)
@given(problems())
def test_residual_plus_adapter_reconstructs_w_to_half_an_ulp(problem):
    rows, cols, r, dtype, niter, alpha, rslora, fan_in_fan_out, seed, magnitude = problem
    g = torch.Generator().manual_seed(seed)
    stored_shape = (cols, rows) if fan_in_fan_out else (rows, cols)
    weight = (torch.randn(stored_shape, generator=g) * magnitude).to(dtype)
    s = scaling(r, alpha, rslora)
    f = principal_factors(weight, r, s, niter=niter, seed=seed, fan_in_fan_out=fan_in_fan_out)

    assert f.lora_A.shape == (r, cols) and f.lora_B.shape == (rows, r)
    assert f.residual.shape == weight.shape and f.residual.dtype == dtype
    # s*B@A as PEFT computes it, from the stored factors, back in the stored layout.
    delta = (s * f.lora_B.float()) @ f.lora_A.float()
    if fan_in_fan_out:
        delta = delta.T
    error = (weight.double() - (f.residual.double() + delta.double())).abs()
    assert torch.all(error <= half_ulp(f.residual)), (error - half_ulp(f.residual)).max()
    cast_error = (f.residual.float() - (weight.float() - delta)).abs().max().item()
    assert f.max_abs_error == pytest.approx(cast_error, rel=1e-6, abs=1e-30)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_exact_svd_keeps_the_top_r_energy(problem):
    rows, cols, r, dtype, _, alpha, rslora, _, seed, _ = problem
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    f = principal_factors(weight, r, scaling(r, alpha, rslora), niter=0)
    S = torch.linalg.svdvals(weight.double())
    assert torch.allclose(f.singular_values.double(), S[:r], rtol=1e-4, atol=1e-5)
    expected = (S[:r].square().sum() / S.square().sum()).item()
    assert f.energy_kept == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_difference_is_correct_rounding_even_at_ties(dtype):
    from pissa_rs.factors import round_difference

    g = torch.Generator().manual_seed(0)
    w = torch.randn(200_000, generator=g) * 0.02
    d = torch.randn(200_000, generator=g) * 0.02
    # Exact ties of `dtype` in float32, nudged off by a delta below float32's resolution.
    tie = torch.tensor([1 + 2**-8, 1 + 2**-8, 1 + 2**-11, 1 + 2**-11, 2**-20 * 3, 0.5 + 2**-12])
    nudge = torch.tensor([2**-30, -(2**-30), 2**-30, -(2**-30), 2**-45, 2**-40])
    w, d = torch.cat([w, tie]), torch.cat([d, nudge])
    expected = (w.double() - d.double())
    got = round_difference(w, d, dtype)[0].double()
    # Correct rounding: no representable value of dtype is closer than ours.
    up = torch.nextafter(got.to(dtype), torch.tensor(float("inf"), dtype=dtype)).double()
    down = torch.nextafter(got.to(dtype), torch.tensor(float("-inf"), dtype=dtype)).double()
    err = (got - expected).abs()
    assert torch.all(err <= (up - expected).abs()) and torch.all(err <= (down - expected).abs())


def test_factors_are_peft_formulas():
    torch.manual_seed(0)
    w = torch.randn(20, 12)
    r, s = 4, 0.5
    f = principal_factors(w, r, s, niter=0)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    Sr = S[:r] / s
    assert torch.allclose(f.lora_A, torch.diag(torch.sqrt(Sr)) @ Vh[:r], atol=1e-5)
    assert torch.allclose(f.lora_B, U[:, :r] @ torch.diag(torch.sqrt(Sr)), atol=1e-5)


def test_randomized_svd_is_seeded_per_tensor():
    w = torch.randn(64, 32)
    a = principal_factors(w, 8, 1.0, niter=2, seed=tensor_seed(0, "x"))
    torch.randn(100)  # global RNG use in between must not matter
    b = principal_factors(w, 8, 1.0, niter=2, seed=tensor_seed(0, "x"))
    c = principal_factors(w, 8, 1.0, niter=2, seed=tensor_seed(0, "y"))
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.residual, b.residual)
    assert not torch.equal(a.lora_A, c.lora_A)
    assert tensor_seed(0, "x") != tensor_seed(1, "x")


def test_rslora_scale():
    assert scaling(16, 32) == 2.0
    assert scaling(16, 32, use_rslora=True) == 32 / math.sqrt(16)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 2, 2), torch.zeros(4, 4, dtype=torch.float64)])
def test_bad_weights_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        principal_factors(bad, 1, 1.0)


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank 5"):
        principal_factors(torch.zeros(4, 8), 5, 1.0)
