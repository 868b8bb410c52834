import pytest
import torch

from flexlora import FlexLoRAConfig
from flexlora.schedule import in_allocation_window, paper_budget, ranks_to_move
from flexlora.selection import first_free_slot, select_matrices, weakest_active_slot


def test_paper_budget_known_points():
    # b0=4, t_warmup=100, t_final=100, T=1000 -> b(t) = round(4 (1 - (t-100)/900)^3)
    assert paper_budget(100, 4, 100, 100, 1000) == 4
    assert paper_budget(250, 4, 100, 100, 1000) == 2  # 4 * (5/6)^3 = 2.31
    assert paper_budget(400, 4, 100, 100, 1000) == 1  # 4 * (2/3)^3 = 1.19
    assert paper_budget(700, 4, 100, 100, 1000) == 0  # 4 * (1/3)^3 = 0.15
    assert paper_budget(50, 4, 100, 100, 1000) == 4  # before warmup the raw value exceeds b0: clamped
    assert paper_budget(2000, 4, 100, 100, 1000) == 0  # past T: negative -> clamped to 0


def test_allocation_window_and_period():
    steps = [t for t in range(0, 1001) if in_allocation_window(t, 100, 100, 1000, 200)]
    assert steps == [100, 300, 500, 700, 900]


def test_ranks_to_move_uses_config():
    config = FlexLoRAConfig(target_modules=["q"], b0=4, t_warmup=10, t_final=10, delta_t=5, total_steps=100)
    assert ranks_to_move(10, config) == 4
    assert ranks_to_move(11, config) == 0
    assert ranks_to_move(95, config) == 0  # inside the final freeze
    constant = config.replace(schedule="constant")
    assert ranks_to_move(85, constant) == 4
    with pytest.raises(ValueError, match="total_steps"):
        ranks_to_move(10, config.replace(total_steps=None))


def test_selection_prunes_least_and_expands_most_important():
    scores = [0.5, 0.1, 0.9, 0.3, 0.8]
    ranks = [4, 4, 4, 4, 4]
    prune, expand = select_matrices(scores, ranks, 2, min_rank=1, max_rank=6, mode="flex")
    assert prune == [1, 3] and expand == [2, 4]


def test_selection_respects_rank_limits_and_conserves_budget():
    scores = [0.1, 0.2, 0.9, 0.8]
    ranks = [1, 3, 6, 3]  # 0 is at min_rank, 2 at max_rank
    prune, expand = select_matrices(scores, ranks, 2, min_rank=1, max_rank=6, mode="flex")
    assert 0 not in prune and 2 not in expand
    assert len(prune) == len(expand)
    assert not set(prune) & set(expand)
    assert prune == [1] and expand == [3]  # only one pair possible without overlap


def test_selection_ties_break_by_module_order():
    prune, expand = select_matrices([0.5] * 6, [4] * 6, 2, 1, 6, "flex")
    assert prune == [0, 1] and expand == [2, 3]
    assert select_matrices([0.5] * 6, [4] * 6, 2, 1, 6, "flex") == (prune, expand)


def test_selection_modes_and_zero_budget():
    scores, ranks = [0.3, 0.1, 0.9], [4, 4, 4]
    assert select_matrices(scores, ranks, 1, 1, 6, "prune_only") == ([1], [])
    assert select_matrices(scores, ranks, 1, 1, 6, "expand_only") == ([], [2])
    assert select_matrices(scores, ranks, 0, 1, 6, "flex") == ([], [])
    with pytest.raises(ValueError, match="mode"):
        select_matrices(scores, ranks, 1, 1, 6, "both")


def test_random_selections_conserve_total_rank():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(2, 12, (1,), generator=generator))
        scores = torch.rand(n, generator=generator).tolist()
        ranks = torch.randint(1, 7, (n,), generator=generator).tolist()
        prune, expand = select_matrices(scores, ranks, 3, 1, 6, "flex")
        assert len(prune) == len(expand) <= 3
        assert not set(prune) & set(expand)
        assert all(ranks[i] > 1 for i in prune) and all(ranks[i] < 6 for i in expand)
        if prune:
            # nothing left out of the prune set scores lower than what was pruned (among eligible ones)
            eligible = [i for i in range(n) if ranks[i] > 1]
            assert max(scores[i] for i in prune) <= min([scores[i] for i in eligible if i not in prune] or [1.0])


def test_slot_choice():
    lam = torch.tensor([0.5, -0.1, 0.1, 9.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    assert weakest_active_slot(lam, mask) == 1  # |-0.1| ties |0.1|: lowest index
    assert first_free_slot(mask) == 3
    with pytest.raises(ValueError):
        first_free_slot(torch.ones(3))
    with pytest.raises(ValueError):
        weakest_active_slot(lam, torch.zeros(5))
