"""spectrum: metrics of planted spectra known in closed form; top-K tails as documented bounds."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_tools.linalg import RankRule, singular_values
from lowrank_tools.linalg.spectrum import (cumulative_energy, effective_rank, energy_rank, level_key, spectrum_metrics,
                                    stable_rank)


def _planted(values, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(values) V^T with orthonormal U (m, k), V (n, k)."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * torch.tensor(values, dtype=torch.float64)) @ V.T


def _entropy_rank(values) -> float:
    total = sum(values)
    return math.exp(-sum(v / total * math.log(v / total) for v in values if v > 0))


def test_8_4_2_1_closed_form():
    m = spectrum_metrics([8.0, 4.0, 2.0, 1.0])
    p = [8 / 15, 4 / 15, 2 / 15, 1 / 15]
    assert m.effective_rank == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-12)
    assert m.effective_rank == pytest.approx(3.1171, abs=1e-4)  # exp(1.1369...)
    assert m.stable_rank == pytest.approx(85 / 64, rel=1e-12)
    # cumulative energy 64/85 = 0.753, 80/85 = 0.941, 84/85 = 0.988, 1
    assert m.energy_rank == {"0.5": 1, "0.9": 2, "0.95": 3, "0.99": 4}
    assert m.complete and m.estimated == () and m.total_energy == 85
    assert cumulative_energy([8, 4, 2, 1]).tolist() == pytest.approx([64 / 85, 80 / 85, 84 / 85, 1.0], rel=1e-12)


def test_8_4_2_1_from_the_matrix():
    S = singular_values(_planted([8.0, 4.0, 2.0, 1.0], 12, 9).float())
    m = spectrum_metrics(S)
    assert S[:4].tolist() == pytest.approx([8, 4, 2, 1], rel=1e-5)
    assert m.effective_rank == pytest.approx(_entropy_rank([8, 4, 2, 1]), rel=1e-5)
    assert m.stable_rank == pytest.approx(85 / 64, rel=1e-5)
    assert m.energy_rank == {"0.5": 1, "0.9": 2, "0.95": 3, "0.99": 4}


@pytest.mark.parametrize("n", [1, 3, 17])
def test_flat_spectrum_has_full_ranks(n):
    m = spectrum_metrics([2.5] * n)
    assert m.effective_rank == pytest.approx(n, rel=1e-12)
    assert m.stable_rank == pytest.approx(n, rel=1e-12)
    assert m.energy_rank["0.99"] == n and m.energy_rank["0.5"] == math.ceil(n / 2)


def test_zeros_do_not_count_and_order_does_not_matter():
    assert effective_rank([0.0, 3.0, 0.0]) == pytest.approx(1.0)
    assert stable_rank([1.0, 2.0]) == pytest.approx(5 / 4)
    m = spectrum_metrics([0.0, 0.0])
    assert m.effective_rank == 0 and m.stable_rank == 0 and set(m.energy_rank.values()) == {0}


def test_exact_boundary_is_not_off_by_one():
    # c_1 = 9 / 10 exactly: 90 % needs rank 1, 90.0001 % needs rank 2
    assert energy_rank([3.0, 1.0], 0.9) == (1, False)
    assert energy_rank([3.0, 1.0], 0.900001) == (2, False)
    assert energy_rank([3.0, 1.0], 1.0) == (2, False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 100.0)), min_size=1, max_size=12), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_energy_rank_matches_the_energy_rule(values, level):
    if max(values) == 0:
        return
    r, estimated = energy_rank(values, level)
    assert not estimated
    assert r == RankRule(energy=level).choose(torch.tensor(values, dtype=torch.float64))


def test_top_k_tail_model():
    # the full spectrum 8, 4, 2, 1 (E = 85) seen through its top 2 only
    m = spectrum_metrics([8.0, 4.0], total_energy=85.0, full_length=4)
    assert not m.complete
    assert m.stable_rank == pytest.approx(85 / 64)  # exact: uses ||M||_F
    assert m.energy_rank["0.5"] == 1 and m.energy_rank["0.9"] == 2  # reached inside the top 2: exact
    # 95 %: 0.75 missing, tail values <= 4, so at least one more: 3 (the truth is 3)
    # 99 %: 4.15 missing -> at least ceil(4.15 / 16) = 1 more: 3, a lower bound of the true 4
    assert m.energy_rank["0.95"] == 3 and m.energy_rank["0.99"] == 3
    assert m.estimated == ("effective_rank", "0.95", "0.99")
    # tail energy 5 as ceil(5 / 16) = 1 value of sqrt(5)
    assert m.effective_rank == pytest.approx(_entropy_rank([8, 4, math.sqrt(5)]), rel=1e-12)
    assert cumulative_energy([8.0, 4.0], total_energy=85).tolist() == pytest.approx([64 / 85, 80 / 85])


def test_top_k_tail_capped_by_full_length():
    # tail energy 50 over at most 1 remaining value: the bound cannot exceed the matrix's side
    r, estimated = energy_rank([1.0], 0.99, total_energy=51.0, full_length=2)
    assert (r, estimated) == (2, True)
    assert level_key(0.5) == "0.5" and level_key(0.95) == "0.95"


def test_top_k_without_tail_energy_is_complete():
    m = spectrum_metrics([5.0, 3.0], total_energy=34.0, full_length=100)  # exactly rank 2
    assert m.complete and m.estimated == ()
    assert m.effective_rank == pytest.approx(_entropy_rank([5, 3]))


def test_estimated_energy_ranks_are_lower_bounds():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(2, 40)
        full = sorted((rng.random() ** rng.choice([1, 3, 6]) for _ in range(n)), reverse=True)
        k = rng.randint(1, n)
        total = sum(s * s for s in full)
        for level in (0.5, 0.9, 0.95, 0.99):
            true_r, _ = energy_rank(full, level)
            r, estimated = energy_rank(full[:k], level, total_energy=total, full_length=n)
            assert r <= true_r
            assert estimated or r == true_r
