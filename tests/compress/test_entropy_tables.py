"""The entropy decoder's multi-symbol table equals decoding each 12-bit pattern code by code."""

import numpy as np
import pytest

from moeflow.compress import entropy as E


def _single(lengths, codes):
    single = np.zeros(E.TABLE_SIZE, np.uint32)
    for s in range(256):
        if lengths[s]:
            single[int(codes[s]) :: 1 << int(lengths[s])] = s | (int(lengths[s]) << 8)
    return single


def _reference(single):
    """Entry idx: up to four whole codes read from the low bits of idx, within 12 bits."""
    out = np.zeros(E.TABLE_SIZE, np.uint64)
    for idx in range(E.TABLE_SIZE):
        syms, used, x = [], 0, idx
        while len(syms) < 4:
            e = int(single[x])
            if e >> 8 == 0 or used + (e >> 8) > E.MAX_LEN:
                break
            syms.append(e & 0xFF)
            used += e >> 8
            x >>= e >> 8
        out[idx] = (
            sum(s << (8 * i) for i, s in enumerate(syms))
            | used << E.MULTI_USED
            | len(syms) << E.MULTI_COUNT
        )
    return out


def _codes(seed):
    rng = np.random.default_rng(seed)
    lengths = np.zeros(256, np.int64)
    m = int(rng.integers(1, 60))
    syms = rng.choice(256, m, replace=False)
    if seed % 2:  # Huffman lengths of skewed counts (complete codes, lengths up to 12)
        counts = np.zeros(256, np.int64)
        counts[syms] = (rng.pareto(0.7, m) * 100 + 1).astype(np.int64)
        lengths = E.huffman_lengths(counts, E.MAX_LEN)
    else:  # any Kraft-valid lengths, complete or not (what a corrupt chunk may declare)
        lengths[syms] = rng.integers(1, E.MAX_LEN + 1, m)
        while (2.0 ** -lengths[syms]).sum() > 1:
            lengths[syms] = np.minimum(lengths[syms] + 1, E.MAX_LEN)
            if (lengths[syms] == E.MAX_LEN).all() and m > E.TABLE_SIZE:
                break
    codes, ok = E.canonical_codes(lengths, E.MAX_LEN)
    assert ok
    return lengths, codes


@pytest.mark.parametrize("seed", range(12))
def test_multi_table_matches_code_by_code_decoding(seed):
    lengths, codes = _codes(seed)
    single = _single(lengths, codes)
    multi = np.full(E.TABLE_SIZE, 0xDEAD, np.uint64)  # stale contents must all be overwritten
    E._build_multi(
        lengths, codes, single, multi, np.zeros(256, np.int64), np.zeros(2 * E.TABLE_SIZE, np.int32)
    )
    np.testing.assert_array_equal(multi, _reference(single))


def test_single_symbol_code_marks_unused_patterns_invalid():
    lengths = np.zeros(256, np.int64)
    lengths[77] = 1
    codes, _ = E.canonical_codes(lengths, E.MAX_LEN)
    single = _single(lengths, codes)
    multi = np.full(E.TABLE_SIZE, 5, np.uint64)
    E._build_multi(
        lengths, codes, single, multi, np.zeros(256, np.int64), np.zeros(2 * E.TABLE_SIZE, np.int32)
    )
    assert (multi[1::2] == 0).all()  # odd patterns start no code: count 0 (invalid)
    assert multi[0] == 77 * 0x01010101 | 4 << E.MULTI_USED | 4 << E.MULTI_COUNT  # 4 1-bit codes
    np.testing.assert_array_equal(multi, _reference(single))
