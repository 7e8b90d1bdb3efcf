import torch

from autoprune_ray.compress import allocation
from autoprune_ray.compress.scores import magnitude, ria, wanda
from autoprune_ray.compress.stats import InputStats


def stats_from(x: torch.Tensor, samples: int) -> InputStats:
    st = InputStats()
    st.update(x, samples=samples, with_gram=True)
    return st


def test_wanda_score_by_hand():
    # two samples of 2 tokens each, 3 input channels
    x = torch.tensor([[[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]], [[3.0, 0.0, 0.0], [1.0, 2.0, 2.0]]])
    st = stats_from(x, samples=2)
    # scaler_row_j = Σ_t x_tj² / samples = [12, 5, 8] / 2
    assert torch.allclose(st.wanda_norm, torch.tensor([6.0, 2.5, 4.0]).sqrt())
    w = torch.tensor([[1.0, -2.0, 0.5]])
    assert torch.allclose(wanda(w, st), torch.tensor([[6.0 ** 0.5, 2 * 2.5 ** 0.5, 0.5 * 2.0]]))
    assert torch.allclose(magnitude(w), w.abs())


def test_input_statistics_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    st = stats_from(x, samples=1)
    assert torch.allclose(st.mean, torch.tensor([2.0, 0.0]))
    assert torch.allclose(st.var, torch.tensor([1.0, 4.0]))
    assert torch.allclose(st.norm, torch.tensor([10.0 ** 0.5, 8.0 ** 0.5]))
    assert torch.allclose(st.gram, torch.tensor([[10.0, -4.0], [-4.0, 8.0]]))


def test_ria_score_by_hand():
    w = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    st = stats_from(torch.tensor([[4.0, 1.0]]), samples=1)   # norms 4 and 1
    # |W|/Σcol = [[1/3, 3/5], [2/3, 2/5]], |W|/Σrow = [[1/4, 3/4], [1/2, 1/2]], times norm^0.5 = [2, 1]
    expected = torch.tensor([[(1 / 3 + 1 / 4) * 2, 3 / 5 + 3 / 4], [(2 / 3 + 1 / 2) * 2, 2 / 5 + 1 / 2]])
    assert torch.allclose(ria(w, st), expected)


def test_owl_allocation_by_hand():
    s = allocation.owl(0.7, [0.01, 0.03, 0.02], lam=0.08)
    # scaled = [0, 0.16, 0.08], mean 0.08 -> density = 0.3 + [-0.08, 0.08, 0]
    assert torch.allclose(torch.tensor(s, dtype=torch.float64), torch.tensor([0.78, 0.62, 0.70], dtype=torch.float64))
    assert abs(sum(s) / 3 - 0.7) < 1e-12
    assert allocation.owl(0.5, [0.2, 0.2], lam=0.1) == [0.5, 0.5]


def test_owl_outlier_ratio_counts_scores_above_m_times_mean():
    st = stats_from(torch.ones(1, 4), samples=1)
    w = {"a": torch.tensor([[10.0, 1.0, 1.0, 1.0]]), "b": torch.tensor([[1.0, 1.0, 1.0, 1.0]])}
    # scores: one 10 and seven 1s, mean 17/8; above 2·mean=4.25 is one of eight
    assert allocation.outlier_ratio(w, {"a": st, "b": st}, m=2.0) == 1 / 8
