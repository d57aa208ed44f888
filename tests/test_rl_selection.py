import pytest
import torch

from egspo.rl.selection import select_steps


def _as_lists(sel):
    return sel.steps.tolist(), sel.weights.tolist()


def test_high_entropy_picks_top_k_per_row_in_time_order():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3],
                            [0.8, 0.2, 0.6, 0.4, 1.0]])
    sel = select_steps(entropy, 3, "high_entropy")
    # row 0: 0.9@1, 0.7@3, 0.5@2 ; row 1: 1.0@4, 0.8@0, 0.6@2
    assert sel.steps.tolist() == [[1, 2, 3], [0, 2, 4]]
    assert sel.weights.tolist() == [[1.0] * 3, [1.0] * 3]
    assert sel.steps.dtype == torch.long


def test_high_entropy_ties_prefer_earlier_step():
    entropy = torch.tensor([[0.5, 0.5, 0.9, 0.5]])
    sel = select_steps(entropy, 2, "high_entropy")
    assert sel.steps.tolist() == [[0, 2]]
    sel3 = select_steps(entropy, 3, "high_entropy")
    assert sel3.steps.tolist() == [[0, 1, 2]]


def test_invalid_steps_are_never_selected():
    entropy = torch.tensor([[0.9, 0.1, 0.8, 0.7]])
    valid = torch.tensor([[False, True, True, True]])
    sel = select_steps(entropy, 2, "high_entropy", valid_steps=valid)
    assert _as_lists(sel) == ([[2, 3]], [[1.0, 1.0]])


def test_stop_at_last_content_pads_with_weight_zero():
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.8],
                            [0.5, 0.4, 0.3, 0.2, 0.1],
                            [0.5, 0.4, 0.3, 0.2, 0.1]])
    last = torch.tensor([1, 4, -1])  # row 2 committed only end tokens: no candidate at all
    sel = select_steps(entropy, 3, "high_entropy", last_content_step=last, stop_at_last_content=True)
    steps, weights = _as_lists(sel)
    assert steps[0] == [0, 1, 1] and weights[0] == [1.0, 1.0, 0.0]
    assert steps[1] == [0, 1, 2] and weights[1] == [1.0, 1.0, 1.0]
    assert steps[2] == [0, 0, 0] and weights[2] == [0.0, 0.0, 0.0]
    # without the option the late high-entropy steps of row 0 are taken
    assert select_steps(entropy, 3, "high_entropy", last_content_step=last).steps[0].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="last_content_step"):
        select_steps(entropy, 3, "high_entropy", stop_at_last_content=True)


def test_uniform_is_evenly_spaced_over_candidates():
    entropy = torch.zeros(1, 9)
    assert select_steps(entropy, 3, "uniform").steps.tolist() == [[0, 4, 8]]
    # 8 candidates, K=3: positions 0, 3.5 -> 4, 7
    assert select_steps(torch.zeros(1, 8), 3, "uniform").steps.tolist() == [[0, 4, 7]]
    assert select_steps(torch.zeros(1, 10), 4, "uniform").steps.tolist() == [[0, 3, 6, 9]]
    # candidates 1, 2, 4, 5, 7 -> list positions 0, 2, 4 -> steps 1, 4, 7
    valid = torch.tensor([[False, True, True, False, True, True, False, True, False],
                          [False, False, False, True, False, False, True, False, False]])
    sel = select_steps(torch.zeros(2, 9), 3, "uniform", valid_steps=valid)
    assert sel.steps.tolist() == [[1, 4, 7], [3, 6, 6]]
    assert sel.weights.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def test_random_is_reproducible_distinct_and_leaves_global_rng_alone():
    entropy = torch.rand(4, 32)
    valid = torch.ones(4, 32, dtype=torch.bool)
    valid[1, 10:] = False  # row 1 has only 10 candidates
    state = torch.random.get_rng_state()
    a = select_steps(entropy, 8, "random", valid_steps=valid, generator=torch.Generator().manual_seed(3))
    b = select_steps(entropy, 8, "random", valid_steps=valid, generator=torch.Generator().manual_seed(3))
    c = select_steps(entropy, 8, "random", valid_steps=valid, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.steps, b.steps) and not torch.equal(a.steps, c.steps)
    for row in a.steps.tolist():
        assert row == sorted(row) and len(set(row)) == 8
    assert (a.steps[1] < 10).all() and a.weights.sum().item() == 32
    with pytest.raises(ValueError, match="Generator"):
        select_steps(entropy, 8, "random")


def test_random_pads_rows_with_few_candidates():
    valid = torch.tensor([[True, False, True, False, False, False]])
    sel = select_steps(torch.zeros(1, 6), 3, "random", valid_steps=valid, generator=torch.Generator().manual_seed(0))
    assert sel.steps.tolist() == [[0, 2, 2]] and sel.weights.tolist() == [[1.0, 1.0, 0.0]]


def test_adaptive_smallest_k_reaching_alpha_mass():
    entropy = torch.tensor([[1.0, 4.0, 2.0, 3.0],   # total 10, need 7: 4 + 3 -> K=2 (steps 1, 3)
                            [1.0, 1.0, 1.0, 1.0]])  # total 4, need 2.8: 1 + 1 + 1 -> K=3 (ties: 0, 1, 2)
    sel = select_steps(entropy, 4, "adaptive", alpha=0.7)
    assert sel.steps.tolist() == [[1, 3, 3], [0, 1, 2]]
    assert sel.weights.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    # K_max caps K_i
    capped = select_steps(entropy, 2, "adaptive", alpha=0.7)
    assert capped.steps.tolist() == [[1, 3], [0, 1]] and capped.weights.sum().item() == 4


def test_adaptive_width_agreed_across_processes():
    entropy = torch.tensor([[1.0, 4.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    seen = []

    def fake_all_reduce_max(local: int) -> int:
        seen.append(local)
        return 4  # another process needed 4

    sel = select_steps(entropy, 4, "adaptive", alpha=0.7, k_max_reduce=fake_all_reduce_max)
    assert seen == [3]
    assert sel.steps.tolist() == [[1, 3, 3, 3], [0, 1, 2, 2]]
    assert sel.weights.tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="k_max_reduce"):
        select_steps(entropy, 4, "adaptive", alpha=0.7, k_max_reduce=lambda k: 1)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Unknown step selection"):
        select_steps(torch.zeros(1, 4), 2, "entropy")
    with pytest.raises(ValueError, match="k=5"):
        select_steps(torch.zeros(1, 4), 5, "high_entropy")


def test_published_random_and_uniform_use_one_step_set_ending_at_the_last_step():
    entropy = torch.rand(4, 16)
    gen = torch.Generator().manual_seed(3)
    sel = select_steps(entropy, 6, "random", generator=gen, as_published=True)
    assert (sel.steps == sel.steps[0]).all(), "the same steps for every row"
    assert (sel.steps[:, -1] == 15).all() and (sel.weights == 1).all()
    # drawn with replacement: over many draws of 6 from 15, repeats happen (distinct draws never repeat)
    repeats = sum(
        int(select_steps(entropy, 6, "random", generator=gen, as_published=True).steps[0].unique().numel() < 6)
        for _ in range(50))
    assert repeats > 0
    default = select_steps(entropy, 6, "random", generator=torch.Generator().manual_seed(3))
    assert all(row.unique().numel() == 6 for row in default.steps), "the default draws distinct steps per row"
    uni = select_steps(entropy, 4, "uniform", as_published=True)
    assert uni.steps[0].tolist() == [0, 5, 10, 15] and (uni.steps == uni.steps[0]).all()
