"""Bit-exact round trips of the entropy and TBE codecs, shapes, dtypes, no mutation."""

import numpy as np
import pytest
import torch

from moeflow.compress import CompressedTensor, compress, decompress, entropy, tbe, tensor_stats
from moeflow.errors import ConfigError, InputError

CODECS = ["entropy", "tbe"]


def all_patterns(dtype):
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return
    ia = a.contiguous().reshape(-1).view(torch.uint8)
    ib = b.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(ia, ib)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_65536_patterns_round_trip(codec, dtype):
    # every NaN payload, +-inf, +-0 and subnormal of the format
    x = all_patterns(dtype)
    same_bits(decompress(compress(x, codec)), x)
    # shuffled and 2-D, so patterns land in every tile/stream position
    perm = torch.randperm(65536, generator=torch.Generator().manual_seed(1))
    y = x[perm].reshape(256, 256)
    same_bits(decompress(compress(y, codec)), y)


def test_fp32_special_values_round_trip():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 300_001, dtype=np.uint64).astype(np.uint32)
    bits[:8] = [0x7FC00001, 0xFFC12345, 0x7F800000, 0xFF800000, 0, 0x80000000, 1, 0x807FFFFF]
    x = torch.from_numpy(bits.view(np.int32)).view(torch.float32)
    same_bits(decompress(compress(x, "entropy")), x)
    g = torch.randn(70_000) * 0.02
    blob = compress(g, "entropy")
    same_bits(decompress(blob), g)
    assert len(blob) < 0.9 * g.numel() * 4


SHAPES = [
    (0,),
    (1,),
    (),
    (7,),
    (3, 5),
    (0, 4),
    (4, 0),
    (63, 65),
    (1, 129),
    (2, 3, 17),
    (5, 1, 1, 9),
    (131_073,),
]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_round_trip(codec, shape):
    g = torch.Generator().manual_seed(len(shape) * 31 + sum(shape))
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        y = decompress(compress(x, codec))
        same_bits(y, x)


@pytest.mark.parametrize("codec", CODECS + ["raw"])
def test_non_contiguous_views_and_no_mutation(codec):
    base = (torch.randn(40, 90) * 0.02).to(torch.bfloat16)
    for view in (base[:, ::3], base.T, base[5:17, 3:70], base.reshape(90, 40)[::2]):
        before = view.clone()
        snapshot = base.clone()
        y = decompress(compress(view, codec))
        same_bits(y, before)
        same_bits(base, snapshot)  # input untouched
        assert y.is_contiguous()


def test_no_mutation_of_numpy_buffers():
    bits = np.arange(65536, dtype=np.uint16)
    keep = bits.copy()
    for codec in CODECS:
        ct = CompressedTensor.from_bits(bits, "bfloat16", (256, 256), codec)
        assert np.array_equal(bits, keep)
        assert np.array_equal(ct.to_bits(), keep)


def test_entropy_ratio_within_half_percent_of_bound():
    x = (torch.randn(1 << 21, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    s = tensor_stats(x)
    bound = 16 / (8 + s.exp_entropy)
    ratio = x.numel() * 2 / len(compress(x, "entropy"))
    assert ratio >= 0.995 * bound, (ratio, bound)
    assert ratio <= bound * 1.01  # a code cannot beat the order-0 bound by much on iid data


def test_tbe_ratio_matches_coverage_formula():
    x = (torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(
        torch.bfloat16
    )
    s = tensor_stats(x)
    blob = compress(x, "tbe")
    bits = 8 * len(blob) / x.numel()
    # 19 - 8p bits per value plus block offsets and header
    assert abs(bits - (19 - 8 * s.window_coverage)) < 0.05, (bits, s.window_coverage)
    assert x.numel() * 2 / len(blob) > 1.40


def test_thread_count_does_not_change_bytes():
    x = (torch.randn(600_000) * 0.02).to(torch.bfloat16)
    for codec in CODECS:
        a = CompressedTensor.from_tensor(x, codec, threads=1).to_bytes()
        b = CompressedTensor.from_tensor(x, codec, threads=2).to_bytes()
        assert a == b
        same_bits(CompressedTensor.from_bytes(a).to_tensor(threads=2), x)


def test_incompressible_chunks_are_stored():
    bits = np.random.default_rng(3).integers(0, 65536, 400_000, dtype=np.uint64).astype(np.uint16)
    payload, _ = entropy.encode(bits, "bfloat16", 1)
    assert payload.size <= bits.nbytes + 200  # stored chunks: bounded expansion
    out, _ = entropy.decode(payload, "bfloat16", bits.size, 1)
    assert np.array_equal(out, bits)


def test_huffman_lengths_respect_limit_and_kraft():
    counts = np.array([2 ** min(i, 40) for i in range(60)] + [0] * 196, np.int64)
    lengths = entropy.huffman_lengths(counts, 12)
    used = lengths[counts > 0]
    assert used.max() <= 12 and used.min() >= 1
    assert np.sum(2.0**-used) <= 1.0
    assert np.all(lengths[counts == 0] == 0)


def test_tbe_matrix_shape_rules():
    assert tbe.matrix_shape((3, 4, 5)) == (12, 5)
    assert tbe.matrix_shape((130,)) == (3, 64)
    assert tbe.matrix_shape(()) == (1, 64)
    assert tbe.matrix_shape((0, 7)) == (0, 64)


def test_bad_codec_and_dtype_are_typed_errors():
    with pytest.raises(ConfigError):
        compress(torch.zeros(4), codec="lz4")
    with pytest.raises(InputError):
        compress(torch.zeros(4, dtype=torch.float32), codec="tbe")
    with pytest.raises(InputError):
        compress(torch.zeros(4, dtype=torch.int64), codec="entropy")
    ids = torch.arange(10)
    same_bits(decompress(compress(ids, codec="auto")), ids)
    flags = torch.tensor([True, False, True])
    same_bits(decompress(compress(flags, codec="raw")), flags)


def test_decoder_table_reuse_across_chunks_with_changing_codes():
    # chunks (131072 bf16 values each) alternate between code tables and stored mode, so the
    # decoder's "same lengths as the previous chunk" shortcut is exercised both ways
    rng = np.random.default_rng(5)
    cv = 131072

    def bf16(x):
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)

    parts = [
        bf16(rng.standard_normal(2 * cv) * 0.02),
        rng.integers(0, 65536, cv, dtype=np.uint64).astype(np.uint16),
        bf16(rng.standard_normal(cv) * 3.0),
        bf16(rng.standard_normal(cv + 17) * 0.02),
    ]
    bits = np.concatenate(parts)
    payload, _ = entropy.encode(bits, "bfloat16", 1)
    for threads in (1, 2):
        out, _ = entropy.decode(payload, "bfloat16", bits.size, threads)
        assert np.array_equal(out, bits)
