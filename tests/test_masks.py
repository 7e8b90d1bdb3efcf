import pytest
import torch

from autoprune_ray.compress.masks import is_valid_nm, layer_mask, nm_mask, parse_pattern, row_mask, select_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9])
def test_row_mask_prunes_exact_count_per_row(sparsity):
    score = torch.randn(7, 40)
    mask = row_mask(score, sparsity)
    assert (mask.sum(1) == round(40 * sparsity)).all()
    # every pruned score is <= every kept score within its row
    for r in range(7):
        if 0 < mask[r].sum() < 40:
            assert score[r][mask[r]].max() <= score[r][~mask[r]].min()


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
