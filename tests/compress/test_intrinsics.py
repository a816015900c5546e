"""The LLVM intrinsics of the numba kernels, and the shared-counter work runner."""

import numba as nb
import numpy as np
import pytest

from moeflow.compress import entropy
from moeflow.compress._intrinsics import fetch_add, load_u64, store_u32
from moeflow.compress.bits import readonly
from moeflow.compress.parallel import run_shared, take
from moeflow.errors import ConfigError


@nb.njit
def _loads(buf):
    out = np.empty(buf.size - 7, np.uint64)
    for i in range(buf.size - 7):
        out[i] = load_u64(buf, i)
    return out


@nb.njit
def _store(buf, i, v):
    store_u32(buf, i, v)


@nb.njit(nogil=True)
def _claim(counter, seen):
    """Take items until they run out; mark each one taken; return how many this worker got."""
    k = 0
    while True:
        i = take(counter)
        if i >= seen.size:
            return k
        seen[i] += 1
        k += 1


@nb.njit
def _add(a, v):
    return fetch_add(a, 0, v)


def test_load_u64_reads_little_endian_words_at_every_byte_offset():
    buf = readonly(np.random.default_rng(0).integers(0, 256, 67, dtype=np.uint8))
    want = [int.from_bytes(buf[i : i + 8].tobytes(), "little") for i in range(buf.size - 7)]
    assert _loads(buf).tolist() == want


@pytest.mark.parametrize("offset", [0, 1, 3, 6])
def test_store_u32_writes_exactly_four_bytes(offset):
    buf = np.full(10, 0xAA, np.uint8)
    _store(buf, offset, np.uint64(0x1122334455667788))  # the high half is dropped
    want = np.full(10, 0xAA, np.uint8)
    want[offset : offset + 4] = [0x88, 0x77, 0x66, 0x55]
    assert np.array_equal(buf, want)


def test_fetch_add_returns_the_old_value():
    a = np.array([5, 9], np.int64)
    assert _add(a, 3) == 5 and _add(a, -1) == 8
    assert a.tolist() == [7, 9]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_run_shared_hands_out_every_item_exactly_once(threads):
    seen = np.zeros(20_000, np.int64)
    got = run_shared(lambda ctr: _claim(ctr, seen), seen.size, threads)
    assert len(got) == threads and sum(got) == seen.size
    assert np.all(seen == 1)


def test_run_shared_caps_workers_and_rejects_bad_thread_counts():
    seen = np.zeros(2, np.int64)
    assert sorted(run_shared(lambda ctr: _claim(ctr, seen), 2, 8)) in ([0, 2], [1, 1])
    assert np.all(seen == 1)
    with pytest.raises(ConfigError):
        run_shared(lambda ctr: 0, 4, 0)


def test_entropy_decode_is_the_same_for_every_thread_count():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(9 * 131072 + 11) * 0.02).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    payload, seg = entropy.encode(bits, "bfloat16", 3)
    for threads in (1, 2, 3, 4):
        out, seg2 = entropy.decode(payload, "bfloat16", bits.size, threads)
        assert np.array_equal(out, bits) and np.array_equal(seg, seg2)
