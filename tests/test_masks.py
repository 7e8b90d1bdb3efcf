import pytest
import torch

from autoprune_ray.compress.masks import (is_valid_nm, layer_mask, nm_mask, parse_pattern, row_mask, row_split,
                                          select_mask)


def expected_row_counts(rows: int, cols: int, sparsity: float) -> list[int]:
    """The documented contract: round(s·rows·cols) in all, the first T % rows rows one more."""
    total = round(rows * cols * sparsity)
    return [total // rows + (r < total % rows) for r in range(rows)]


def sorted_reference(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each row's k_r lowest scores by a stable sort: equal scores pruned left to right."""
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    order = torch.sort(score, dim=1, stable=True)[1]
    for r, k in enumerate(expected_row_counts(rows, cols, sparsity)):
        mask[r, order[r, :k]] = True
    return mask


# s·cols fractional (576·0.7, 7·0.3, 9·0.5), exact halves (rows·cols·s = x.5), one row, one column
SHAPES = [(5, 576, 0.7), (1, 7, 0.3), (3, 7, 0.3), (6, 9, 0.5), (1, 5, 0.5), (3, 3, 0.5), (4, 1, 0.5),
          (7, 40, 0.25), (7, 40, 0.9), (4, 10, 0.0), (8, 16, 0.5)]


@pytest.mark.parametrize("rows,cols,sparsity", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_row_mask_prunes_exactly_round_s_rows_cols(rows, cols, sparsity, ties):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    score = torch.randint(0, 4, (rows, cols), generator=g).float() if ties else torch.randn(rows, cols, generator=g)
    mask = row_mask(score, sparsity)
    counts = mask.sum(1)
    assert int(counts.sum()) == round(sparsity * rows * cols)
    assert counts.tolist() == expected_row_counts(rows, cols, sparsity)
    assert int(counts.max() - counts.min()) <= 1
    assert torch.equal(mask, sorted_reference(score, sparsity))


def test_row_counts_hand_example():
    # 3·3·0.5 = 4.5 rounds half to even, to 4: the first row prunes 2, the others 1
    score = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])
    assert row_mask(score, 0.5).tolist() == [[False, True, True], [True, False, False], [False, False, True]]
    assert row_split(3, 3, 0.5) == (1, 1)


@pytest.mark.parametrize("sparsity", [0.5, 0.25, 0.75])
def test_whole_per_row_counts_match_wanda_exactly(sparsity):
    # Wanda (lib/prune.py): stable sort of each row, prune its first int(cols·s) entries
    score = torch.cat([torch.randn(6, 64), torch.randint(0, 3, (6, 64)).float()])
    wanda = torch.zeros_like(score, dtype=torch.bool)
    wanda.scatter_(1, torch.sort(score, dim=-1, stable=True)[1][:, :int(64 * sparsity)], True)
    assert torch.equal(row_mask(score, sparsity), wanda)


def test_layer_mask_thresholds_whole_matrix():
    score = torch.tensor([[1.0, 9.0, 8.0], [2.0, 3.0, 7.0]])
    mask = layer_mask(score, 0.5)
    assert mask.tolist() == [[True, False, False], [True, True, False]]


def test_ties_are_pruned_left_to_right():
    mask = row_mask(torch.ones(1, 4), 0.5)
    assert mask.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2)])
def test_nm_mask_is_valid_and_prunes_smallest(n, m):
    score = torch.randn(5, 32)
    mask = nm_mask(score, n, m)
    assert is_valid_nm(mask, n, m)
    groups, gmask = score.reshape(5, -1, m), mask.reshape(5, -1, m)
    pruned_max = torch.where(gmask, groups, -torch.inf).amax(-1)
    kept_min = torch.where(gmask, torch.inf, groups).amin(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_hand_example():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.9, 0.2]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, False, True, False, True, False, True]]


def test_bad_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match="outside"):
        row_mask(torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError, match="does not divide"):
        nm_mask(torch.randn(2, 6), 2, 4)
    with pytest.raises(ValueError, match="N:M"):
        parse_pattern("4:2")
    with pytest.raises(ValueError, match="2:4"):
        parse_pattern("half")
    with pytest.raises(ValueError, match="granularity"):
        select_mask(torch.randn(2, 4), 0.5, granularity="column")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_in_rows_equals_torch_kthvalue_with_ties_nan_and_strided_input(dtype):
    from autoprune_ray.kernels.select import kth_in_rows
    g = torch.Generator().manual_seed(3)
    score = (torch.rand(9, 40, generator=g) * 4).round().to(dtype)     # many ties
    score[2, 5] = float("nan")                                          # NaN ranks highest in both
    for s in (score, score.t().contiguous().t(), score[:, ::2]):        # contiguous, transposed storage, strided
        for k in (1, 7, s.shape[1]):
            torch.testing.assert_close(kth_in_rows(s, k), s.kthvalue(k, dim=1, keepdim=True).values,
                                       rtol=0, atol=0, equal_nan=True, msg=f"k={k}, strides {s.stride()}")
