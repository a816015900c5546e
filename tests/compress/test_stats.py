import numpy as np
import torch

from moeflow.compress import best_window, entropy_bits, tensor_stats


def test_entropy_of_known_histograms():
    assert entropy_bits(np.array([5, 5, 5, 5])) == 2.0
    assert entropy_bits(np.array([0, 7, 0])) == 0.0
    assert abs(entropy_bits(np.array([1, 3])) - 0.8112781244591328) < 1e-12


def test_best_window_picks_densest_seven():
    h = np.zeros(256, np.int64)
    h[100:110] = [1, 1, 9, 9, 9, 9, 9, 9, 9, 1]
    base, covered = best_window(h)
    assert (base, covered) == (101, 63)  # window [b+1, b+7] = [102, 108]
    h2 = np.zeros(32, np.int64)
    h2[0] = 10  # zeros at exponent 0 need base -1
    assert best_window(h2) == (-1, 10)


def test_tensor_stats_fields():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.bfloat16)
    s = tensor_stats(x)
    assert s.exp_entropy == 2.0 and s.distinct_exponents == 4
    assert s.ideal_bits == 10.0 and abs(s.ideal_ratio - 1.6) < 1e-12
    assert s.window_coverage == 1.0 and s.tbe_bits == 11.0
    assert s.exp_hist[127] == 1 and s.exp_hist.sum() == 4
    f = tensor_stats(torch.tensor([1.0, 1.5], dtype=torch.float16))
    assert f.exp_entropy == 0.0 and f.exp_hist.size == 32
