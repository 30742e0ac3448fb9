"""The pure-torch reference of bitsandbytes' formats, and the choice between it and
bitsandbytes' own kernels. Nothing here depends on which CPU runs it: bitsandbytes
is compared with the reference only where it is right on every CPU (in_features a
multiple of 64, no double quantization: its CPU path for those is torch code or a
kernel that is right there), and the chosen quantizer must equal the reference
everywhere (if the check once per process missed a kernel bug, this finds it)."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pissa_rs.quant as quant_module
from pissa_rs.formats import bnb_reference as ref
from pissa_rs.quant import BITSANDBYTES, REFERENCE, Quantization, choose_quantizer, forget_choices

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def weights(rows, cols, dtype, scale, seed, device="cpu"):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    if seed % 7 == 0:
        x[0] = 0  # an all-zero row
    return x.to(dtype).to(device)


def test_code_tables_are_bitsandbytes_own():
    for kind in ("nf4", "fp4"):
        assert torch.equal(ref.code_table(kind), bnbf.get_4bit_type(kind, device="cpu"))
    assert torch.equal(ref.dynamic_map(), bnbf.create_dynamic_map())


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["nf4", "fp4"]), dtype=st.sampled_from(DTYPES), rows=st.integers(1, 48),
       cols=st.sampled_from([64, 128, 192, 320]), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**16))
def test_reference_4bit_equals_bitsandbytes_bit_for_bit_where_blocks_stay_in_rows(kind, dtype, rows, cols, scale, seed):
    x = weights(rows, cols, dtype, scale, seed)
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type=kind)
    mine = ref.quantize_4bit(x, kind)
    assert torch.equal(mine.packed, packed) and torch.equal(mine.absmax, state.absmax)
    assert torch.equal(ref.dequantize_4bit(mine), bnbf.dequantize_4bit(packed, state))


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(1, 48), cols=st.integers(1, 200), scale=st.floats(1e-4, 1e3),
       seed=st.integers(0, 2**16))
def test_reference_int8_rows_equal_bitsandbytes_bit_for_bit(dtype, rows, cols, scale, seed):
    x = weights(rows, cols, dtype, scale, seed)
    codes, stats, _ = bnbf.int8_vectorwise_quant(x.to(torch.float16))
    mine_codes, mine_stats = ref.int8_rows_quantize(x)
    nonzero = stats > 0  # bitsandbytes divides by zero on an all-zero row; the reference gives zero codes
    assert torch.equal(mine_codes[nonzero], codes[nonzero]) and torch.equal(mine_stats, stats)
    assert not mine_codes[~nonzero].any()
    assert torch.equal(ref.int8_rows_dequantize(codes, stats), bnbf.int8_vectorwise_dequant(codes, stats))


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["nf4", "fp4"]), dtype=st.sampled_from(DTYPES), rows=st.integers(1, 300),
       cols=st.sampled_from([64, 96, 128]), seed=st.integers(0, 2**16))
def test_double_quantization_rounds_each_absmax_to_the_nearest_code_and_bitsandbytes_reads_it(kind, dtype, rows, cols,
                                                                                               seed):
    x = weights(rows, cols, dtype, 1.0, seed)
    mine = ref.quantize_4bit(x, kind, double_quant=True)
    plain = ref.quantize_4bit(x, kind)
    assert torch.equal(mine.packed, plain.packed)  # double quantization changes only how the absmax is kept
    # Each block's absmax, offset by the mean, is stored as the nearest dynamic code (ties: the lower).
    offset = plain.absmax.mean()
    scaled = torch.cat([(block - offset) / (block - offset).abs().max().clamp(min=1e-38)
                        for block in plain.absmax.split(ref.DOUBLE_QUANT_BLOCKSIZE)]).clamp(-1, 1)
    code = ref.dynamic_map()
    distance = (scaled[:, None] - code[None, :]).abs()
    chosen = distance.gather(1, mine.absmax.long()[:, None]).squeeze(1)
    assert torch.all(chosen <= distance.min(dim=1).values + 1e-7)  # + the rounding of x * (1 / absmax)
    assert mine.nested_offset == offset.item()
    # bitsandbytes' own dequantization of the reference's state gives the reference's values.
    if cols % 64 == 0:
        state = bnbf.QuantState(absmax=mine.absmax, shape=x.shape, dtype=x.dtype, blocksize=64,
                                code=ref.code_table(kind), quant_type=kind, offset=torch.tensor(mine.nested_offset),
                                state2=bnbf.QuantState(absmax=mine.nested_absmax, code=ref.dynamic_map(),
                                                       blocksize=256, dtype=torch.float32))
        assert torch.equal(bnbf.dequantize_4bit(mine.packed, state), ref.dequantize_4bit(mine))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["nf4", "fp4", "int8"]), double_quant=st.booleans(), dtype=st.sampled_from(DTYPES),
       rows=st.integers(1, 40), cols=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_the_chosen_quantizer_equals_the_reference_on_any_shape(device, kind, double_quant, dtype, rows, cols, seed):
    quant = Quantization(kind, double_quant=double_quant and kind != "int8")
    x = weights(rows, cols, dtype, 1.0, seed, device)
    if kind == "int8":
        expected = ref.int8_rows_dequantize(*ref.int8_rows_quantize(x)).to(dtype)
    else:
        expected = ref.dequantize_4bit(ref.quantize_4bit(x, kind, double_quant=quant.double_quant))
    assert torch.equal(quant.roundtrip(x), expected), quant.choice(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_bitsandbytes_on_cuda_agrees_with_the_reference(kind):
    """On a GPU, bitsandbytes' kernels are the quantizer training loads with: the
    reference must be them, blocks across rows included."""
    assert choose_quantizer(Quantization(kind), "cuda").backend == BITSANDBYTES


@pytest.fixture
def fresh_choice():
    forget_choices()
    yield
    forget_choices()


def test_a_wrong_kernel_is_found_said_once_and_replaced_by_the_reference(fresh_choice, monkeypatch, caplog):
    # int8: bitsandbytes is right for it on every CPU, so only the planted bug can make it differ.
    real = bnbf.int8_vectorwise_dequant
    monkeypatch.setattr(bnbf, "int8_vectorwise_dequant", lambda codes, stats: real(codes, stats.roll(1)))
    quant = Quantization("int8")
    with caplog.at_level(logging.INFO, logger="pissa_rs"):
        for _ in range(3):
            choice = quant.choice("cpu")
    assert choice.backend == REFERENCE and "int8_vectorwise_dequant differs" in choice.reason
    assert len([r for r in caplog.records if "reference quantizer" in r.getMessage()]) == 1
    x = weights(6, 96, torch.bfloat16, 1.0, 3)
    stored = quant.project(x, torch.bfloat16)
    assert torch.equal(ref.int8_rows_dequantize(*ref.int8_rows_quantize(stored)).to(torch.bfloat16), stored)


def test_without_bitsandbytes_the_reference_is_used(fresh_choice, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    choice = Quantization("fp4").choice("cpu")
    assert choice == quant_module.QuantizerChoice(REFERENCE, "bitsandbytes is not installed")
    x = weights(5, 130, torch.float16, 1.0, 1)
    assert torch.equal(Quantization("fp4").roundtrip(x), ref.dequantize_4bit(ref.quantize_4bit(x, "fp4")))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_chunked_quantization_equals_one_pass(monkeypatch, kind, double_quant):
    """Weights are quantized a few blocks at a time: the chunk boundaries change nothing."""
    x = weights(37, 192, torch.bfloat16, 1.0, 5).reshape(-1)[:-3]  # ends in a partial block of odd length
    whole = ref.quantize_4bit(x, kind, double_quant=double_quant)
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 3 * 128)
    chunked = ref.quantize_4bit(x, kind, double_quant=double_quant)
    assert torch.equal(chunked.packed, whole.packed) and torch.equal(chunked.absmax, whole.absmax)
    assert torch.equal(ref.dequantize_4bit(chunked), ref.dequantize_4bit(whole))
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 1 << 22)
    assert torch.equal(ref.dequantize_4bit(chunked), ref.dequantize_4bit(whole))
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type=kind)
    assert torch.equal(whole.packed, packed)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_the_bitsandbytes_path_where_bitsandbytes_is_right(fresh_choice, kind):
    """Whichever the check chose on this CPU, the bitsandbytes path itself (the one CPUs whose
    kernels agree take) gives the reference's codes and values where its kernels are right."""
    from pissa_rs.quant import QuantizerChoice, remember_choice

    quant = Quantization(kind)
    remember_choice(quant, "cpu", QuantizerChoice(BITSANDBYTES, "forced by the test"))
    x = weights(24, 192, torch.bfloat16, 1.0, 11)
    if kind == "int8":
        assert all(torch.equal(a, b) for a, b in zip(quant.quantize_int8(x), ref.int8_rows_quantize(x)))
        expected = ref.int8_rows_dequantize(*ref.int8_rows_quantize(x)).to(x.dtype)
    else:
        theirs, mine = quant.quantize_4bit(x), ref.quantize_4bit(x, kind)
        assert torch.equal(theirs.packed, mine.packed) and torch.equal(theirs.absmax, mine.absmax)
        expected = ref.dequantize_4bit(mine)
    assert torch.equal(quant.roundtrip(x), expected)
    stored = quant.project(x, torch.bfloat16)
    assert torch.equal(quant.roundtrip(stored), stored)
