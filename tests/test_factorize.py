"""split/merge math in float64: exact reconstruction, the chosen subspace, balanced factors."""
import pytest
import torch

from rosa_scale.factorize import choose_indices, merge, split, window_generator


def _matrix(out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64)


SHAPES = [(48, 32), (32, 48), (40, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method,sampling", [("svd", "random"), ("svd", "random-subset"), ("svd", "top"),
                                             ("svd", "bottom"), ("eigh", "random"), ("eigh", "top"),
                                             ("eigh", "bottom"), ("eigh", "random-subset"), ("qr", "random")])
def test_split_reconstructs_exactly(shape, method, sampling):
    w = _matrix(*shape)
    w_fixed, up, down = split(w, 6, method=method, sampling=sampling, generator=torch.Generator().manual_seed(3))
    assert w_fixed.dtype == up.dtype == down.dtype == torch.float64
    assert up.shape == (shape[0], 6) and down.shape == (6, shape[1])
    torch.testing.assert_close(merge(w_fixed, up, down), w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["svd", "eigh"])
@pytest.mark.parametrize("sampling", ["random", "random-subset", "top", "bottom"])
def test_factors_span_the_chosen_singular_subspace(shape, method, sampling):
    w = _matrix(*shape, seed=1)
    rank = 5
    idx = choose_indices(min(shape), rank, sampling, torch.Generator().manual_seed(7))
    _, up, down = split(w, rank, method=method, sampling=sampling, generator=torch.Generator().manual_seed(7))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    # up = U_J S_J^1/2 and down = S_J^1/2 V_J^T, up to the sign of each singular pair
    expect_up = u[:, idx] * s[idx].sqrt()
    expect_down = s[idx].sqrt()[:, None] * vh[idx]
    signs = torch.sign((up * expect_up).sum(0))
    torch.testing.assert_close(up * signs, expect_up, rtol=0, atol=1e-8)
    torch.testing.assert_close(down * signs[:, None], expect_down, rtol=0, atol=1e-8)
    # the residual has the chosen singular values removed and the others kept
    w_fixed = w - up @ down
    rest = torch.ones(min(shape), dtype=torch.bool)
    rest[idx] = False
    torch.testing.assert_close(torch.linalg.svdvals(w_fixed)[: int(rest.sum())], s[rest], rtol=0, atol=1e-8)


def test_qr_projects_on_a_random_subspace_with_balanced_factors():
    w = _matrix(30, 50, seed=2)
    w_fixed, up, down = split(w, 4, method="qr", generator=torch.Generator().manual_seed(0))
    q = torch.linalg.svd(down, full_matrices=False)[2].T  # orthonormal basis of down's row space
    torch.testing.assert_close(up @ down, w @ q @ q.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(up.T @ up, down @ down.T, rtol=0, atol=1e-10)  # both equal S
    other = split(w, 4, method="qr", generator=torch.Generator().manual_seed(1))[1]
    assert not torch.allclose(up.abs(), other.abs())


def test_float32_split_is_computed_in_float32_and_preserves_weight():
    w = _matrix(64, 32).float()
    for method in ("svd", "eigh", "qr"):
        w_fixed, up, down = split(w, 8, method=method, generator=torch.Generator().manual_seed(0))
        assert w_fixed.dtype == torch.float32
        torch.testing.assert_close(merge(w_fixed, up, down), w, rtol=0, atol=1e-5)


def test_window_sampling():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = choose_indices(20, 4, "random", gen)
        assert (idx.diff() == 1).all() and 0 <= idx[0] and idx[-1] < 20
    assert choose_indices(20, 4, "top").tolist() == [0, 1, 2, 3]
    assert choose_indices(20, 4, "bottom").tolist() == [16, 17, 18, 19]
    sub = choose_indices(20, 4, "random-subset", torch.Generator().manual_seed(1))
    assert len(set(sub.tolist())) == 4 and sub.tolist() == sorted(sub.tolist())


def test_window_generator_depends_on_seed_index_and_name():
    def first(seed, index, name):
        return choose_indices(1000, 8, "random", window_generator(seed, index, name))[0].item()

    assert first(0, 1, "a.q_proj") == first(0, 1, "a.q_proj")
    draws = {first(0, 1, "a.q_proj"), first(1, 1, "a.q_proj"), first(0, 2, "a.q_proj"), first(0, 1, "a.k_proj")}
    assert len(draws) > 2


@pytest.mark.parametrize("rank", [0, 32, 40])
def test_rank_out_of_range_is_refused(rank):
    with pytest.raises(ValueError, match="rank"):
        split(_matrix(32, 40), rank)


def test_bad_method_and_sampling_are_refused():
    with pytest.raises(ValueError, match="method"):
        split(_matrix(8, 8), 2, method="lu")
    with pytest.raises(ValueError, match="sampling"):
        split(_matrix(8, 8), 2, sampling="middle")
    with pytest.raises(ValueError, match="qr"):
        split(_matrix(8, 8), 2, method="qr", sampling="top")


def test_overwrite_reuses_the_input_storage_and_gives_the_same_split():
    w = _matrix(40, 24)
    expected = split(w, 4, generator=torch.Generator().manual_seed(2))
    work = w.clone()
    got = split(work, 4, generator=torch.Generator().manual_seed(2), overwrite=True)
    assert got[0].data_ptr() == work.data_ptr()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    untouched = w.clone()
    split(w, 4, generator=torch.Generator().manual_seed(2))  # default: the input is left alone
    assert torch.equal(w, untouched)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_eigh_factors_stay_balanced_where_float32_eigenvalues_are_noise(shape):
    """Deep in the spectrum an fp32 gram's eigenvalues sit below eps * s_max^2 (even negative);
    the factors must still be balanced (norms sqrt(s) each) and project W on the chosen directions."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 64, generator=g, dtype=torch.float64))
    w = ((u * torch.logspace(0, -6, 64, dtype=torch.float64)) @ v.T).float()
    _, up, down = split(w, 8, method="eigh", sampling="bottom", generator=torch.Generator().manual_seed(0))
    up, down, w = up.double(), down.double(), w.double()
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=0)
    if shape[0] >= shape[1]:  # down's rows are the chosen right directions: up @ down = W V V^T
        basis = down.T / down.norm(dim=1)
        proj = w @ basis @ basis.T
    else:  # up's columns are the chosen left directions: up @ down = U U^T W
        basis = up / up.norm(dim=0)
        proj = basis @ basis.T @ w
    assert (up @ down - proj).norm() < 1e-6 * w.norm()  # fp32 rounding of W V against |W|
