import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stemst.pp import TRANSFORMS, inverse_transform, transform_counts


def test_log2p1_known_values_and_inverse():
    counts = np.array([[0, 1, 3, 7], [15, 0, 0, 1]])
    y = transform_counts(counts, method="log2p1")
    np.testing.assert_allclose(y, [[0, 1, 2, 3], [4, 0, 0, 1]])
    assert y.dtype == np.float32
    np.testing.assert_allclose(inverse_transform(y, method="log2p1"), counts, atol=1e-5)


def test_log1p_cp10k_uses_library_size_and_round_trips():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(20, 6))
    lib = counts.sum(1) + rng.integers(1, 50, size=20)  # a panel: the total over all genes is larger
    y = transform_counts(sp.csr_matrix(counts), method="log1p_cp10k", library_size=lib)
    np.testing.assert_allclose(y, np.log1p(counts / lib[:, None] * 1e4), rtol=1e-6)
    back = inverse_transform(y, method="log1p_cp10k", library_size=lib, dtype=np.float64)
    np.testing.assert_allclose(back, counts, atol=1e-3)
    # default library size: the row sums; an all-zero spot stays zero instead of dividing by zero
    z = transform_counts(np.array([[0, 0], [2, 2]]), method="log1p_cp10k")
    np.testing.assert_allclose(z, [[0, 0], np.log1p([5000, 5000])], rtol=1e-6)


def test_accepts_torch_tensors():
    y = transform_counts(torch.tensor([[3.0, 0.0]]), method="log2p1")
    np.testing.assert_allclose(y, [[2.0, 0.0]])


def test_registry_and_errors():
    assert {"log2p1", "log1p_cp10k"} <= set(TRANSFORMS)
    with pytest.raises(ValueError, match="log2p1"):
        transform_counts(np.ones((2, 2)), method="log10")
    with pytest.raises(ValueError, match="non-negative"):
        transform_counts(np.array([[-1.0]]))
