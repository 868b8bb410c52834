import math

import pytest
import torch

from flexlora.importance import (
    elementwise_energy_entropy,
    frobenius_norm,
    matrix_importance,
    matrixwise_energy_entropy,
    mean_slot_sensitivity,
    nuclear_norm,
    spectral_entropy,
)

SPECTRAL = ["entropy", "nuclear", "frobenius", "elem", "mat"]


def rows(*values, capacity=6):
    lam = torch.zeros(len(values), capacity, dtype=torch.float64)
    mask = torch.zeros_like(lam)
    for i, row in enumerate(values):
        lam[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, : len(row)] = 1
    return lam, mask


def test_entropy_bounds_uniform_and_one_hot():
    lam, mask = rows([1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], [3.0, -1.0, 0.5], [2.0, 2.0])
    scores = spectral_entropy(lam, mask)
    assert scores[0].item() == pytest.approx(1.0, abs=1e-6)  # uniform -> 1
    assert scores[1].item() == pytest.approx(0.0, abs=1e-6)  # one-hot -> 0
    assert 0.0 < scores[2].item() < 1.0
    assert scores[3].item() == pytest.approx(1.0, abs=1e-6)
    random = torch.randn(200, 8, dtype=torch.float64)
    s = spectral_entropy(random, torch.ones_like(random))
    assert ((s >= 0) & (s <= 1)).all()


def test_entropy_matches_the_formula():
    lam, mask = rows([3.0, 2.0, 1.0])
    s = torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64) / 14
    expected = -(s * torch.log(s + 1e-8)).sum() / math.log(3)
    assert spectral_entropy(lam, mask)[0].item() == pytest.approx(expected.item(), rel=1e-12)


def test_entropy_ignores_inactive_slots_and_sign():
    lam, mask = rows([3.0, -2.0, 1.0])
    lam[0, 4] = 100.0  # inactive slot: must not count
    assert spectral_entropy(lam, mask)[0].item() == pytest.approx(spectral_entropy(*rows([3.0, 2.0, 1.0]))[0].item())


def test_entropy_grows_with_the_smallest_singular_value():
    """App. C: shrinking the smallest lambda lowers the importance, so pruning it costs least."""
    values = [spectral_entropy(*rows([4.0, 2.0, x]))[0].item() for x in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)]
    assert values == sorted(values) and values[0] < values[-1]


@pytest.mark.parametrize("metric", SPECTRAL)
def test_edge_cases_never_nan(metric):
    lam, mask = rows([0.0, 0.0, 0.0], [0.7], [], [1e-30, 1e-30])
    scores = matrix_importance(metric, lam, mask)
    assert torch.isfinite(scores).all()
    assert scores[0].item() == 0.0  # all-zero lambda (right after init)
    assert scores[2].item() == 0.0  # empty matrix
    if metric in ("entropy", "elem", "mat"):
        assert scores[1].item() == 0.0  # rank 1: no spread


@pytest.mark.parametrize("metric", SPECTRAL)
def test_non_finite_lambda_raises(metric):
    lam, mask = rows([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(FloatingPointError, match=r"\[0\]"):
        matrix_importance(metric, lam, mask)


def test_norm_metrics_values():
    lam, mask = rows([3.0, -4.0])
    assert nuclear_norm(lam, mask)[0].item() == pytest.approx(3.5)
    assert frobenius_norm(lam, mask)[0].item() == pytest.approx(2.5)


def test_energy_weighted_entropies_follow_eqs_10_and_11():
    lam, mask = rows([3.0, 1.0])
    s = torch.tensor([0.9, 0.1], dtype=torch.float64)
    log_terms = s * torch.log(s + 1e-8)
    elem = -(torch.tensor([3.0, 1.0], dtype=torch.float64) * log_terms).sum() / (2 * math.log(2))
    mat = -4.0 * log_terms.sum() / (2 * math.log(2))
    assert elementwise_energy_entropy(lam, mask)[0].item() == pytest.approx(elem.item())
    assert matrixwise_energy_entropy(lam, mask)[0].item() == pytest.approx(mat.item())


def test_sensitivity_is_mean_over_active_slots():
    slot_scores = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert mean_slot_sensitivity(slot_scores, mask).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="sensitivity"):
        matrix_importance("sensitivity", slot_scores, mask)


def test_unknown_metric_and_bad_shapes():
    lam, mask = rows([1.0, 2.0])
    with pytest.raises(ValueError, match="unknown importance metric"):
        matrix_importance("magic", lam, mask)
    with pytest.raises(ValueError, match=r"\[N, R\]"):
        spectral_entropy(lam[0], mask[0])
