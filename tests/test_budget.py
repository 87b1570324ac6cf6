"""Tests for lowrank_tools.linalg.budget: the greedy allocation against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from lowrank_tools.linalg.budget import LayerSpectrum, _allocate, allocate_budget, uniform_rank_params
from lowrank_tools.errors import InvalidOption


def _retained(layers, ranks: dict[str, int]) -> float:
    return math.fsum(s * s for layer in layers for s in sorted(layer.singular_values, reverse=True)[:ranks[layer.name]])


def _spent(layers, ranks: dict[str, int]) -> int:
    return sum(ranks[layer.name] * layer.unit_cost for layer in layers)


def _brute_force(layers, budget: int, max_rank: int | None = None) -> float:
    caps = [min(len(layer.singular_values), min(layer.shape), max_rank or 99) for layer in layers]
    best = 0.0
    for combo in itertools.product(*(range(c + 1) for c in caps)):
        ranks = {layer.name: r for layer, r in zip(layers, combo)}
        if _spent(layers, ranks) <= budget:
            best = max(best, _retained(layers, ranks))
    return best


def _random_layers(rng: random.Random, explicit_cost: bool) -> list[LayerSpectrum]:
    layers = []
    for i in range(3):
        shape = (rng.randint(1, 6), rng.randint(1, 6))
        k = min(shape[0], shape[1], 5)
        values = sorted((rng.choice([0.0, rng.random(), 3 * rng.random()]) for _ in range(k)), reverse=True)
        cost = rng.randint(1, 12) if explicit_cost else None
        layers.append(LayerSpectrum(f"layer{i}", shape, values, cost))
    return layers


@pytest.mark.parametrize("explicit_cost", [False, True])
def test_matches_brute_force_within_the_bound(explicit_cost):
    rng = random.Random(1234 + explicit_cost)
    exact = 0
    for _ in range(150):
        layers = _random_layers(rng, explicit_cost)
        full = sum(min(len(x.singular_values), min(x.shape)) * x.unit_cost for x in layers)
        budget = rng.randint(min(x.unit_cost for x in layers), full + 3)
        max_rank = rng.choice([None, None, 1, 2, 3])
        ranks = allocate_budget(layers, budget, max_rank=max_rank)
        assert list(ranks) == [x.name for x in layers]
        assert _spent(layers, ranks) <= budget
        assert max_rank is None or max(ranks.values()) <= max_rank
        got, best = _retained(layers, ranks), _brute_force(layers, budget, max_rank)
        first_miss = _allocate(layers, budget, max_rank).first_miss
        assert got <= best + 1e-12
        assert best - got <= (first_miss or 0.0) + 1e-12  # OPT - g_first_miss <= retained
        exact += math.isclose(got, best, rel_tol=1e-12, abs_tol=1e-12)
    assert exact >= 120  # usually optimal


@pytest.mark.parametrize("explicit_cost", [False, True])
def test_never_worse_than_uniform_rank(explicit_cost):
    rng = random.Random(99 + explicit_cost)
    for _ in range(100):
        layers = _random_layers(rng, explicit_cost)
        for r in range(1, 6):
            budget = uniform_rank_params(layers, r)
            ranks = allocate_budget(layers, budget)
            uniform = {x.name: min(r, min(x.shape)) for x in layers}
            assert _spent(layers, ranks) <= budget
            assert _retained(layers, ranks) >= _retained(layers, uniform) - 1e-12


def test_expensive_unit_blocked_by_cheap_ones_falls_back_to_uniform():
    # Greedy by ratio spends on the small layer first and cannot afford the big layer's first unit.
    big = LayerSpectrum("big", (10, 10), [10.0, 0.1])  # gain 100 at cost 20: ratio 5
    small = LayerSpectrum("small", (2, 2), [math.sqrt(30), 5.0])  # gains 30, 25 at cost 4: 7.5, 6.25
    budget = uniform_rank_params([big, small], 1)  # 24
    assert allocate_budget([big, small], budget) == {"big": 1, "small": 1}


def test_budget_smaller_than_one_unit():
    layers = [LayerSpectrum("q_proj", (64, 32), [1.0]), LayerSpectrum("k_proj", (16, 8), [1.0])]
    msg = (r"--budget 23 is smaller than one rank unit of the smallest layer \(24 parameters for k_proj 16 x 8\): "
           r"use --budget 24 or more")
    with pytest.raises(InvalidOption, match=msg):
        allocate_budget(layers, 23)
    assert allocate_budget(layers, 24) == {"q_proj": 0, "k_proj": 1}


def test_bad_arguments():
    layer = LayerSpectrum("a", (4, 4), [1.0])
    with pytest.raises(InvalidOption, match="--budget 10.5 is not a whole number"):
        allocate_budget([layer], 10.5)
    with pytest.raises(InvalidOption, match="--rank 0 is outside"):
        allocate_budget([layer], 100, max_rank=0)
    with pytest.raises(ValueError, match="unique"):
        allocate_budget([layer, layer], 100)
    with pytest.raises(ValueError, match="shape"):
        LayerSpectrum("b", (0, 4), [])
    assert allocate_budget([], 5) == {}


def test_ties_are_broken_by_layer_order():
    a = LayerSpectrum("a", (4, 4), [2.0, 1.0])
    b = LayerSpectrum("b", (4, 4), [2.0, 1.0])
    assert allocate_budget([a, b], 8) == {"a": 1, "b": 0}
    assert allocate_budget([b, a], 8) == {"b": 1, "a": 0}
    assert allocate_budget([a, b], 24) == {"a": 2, "b": 1}
    assert all(allocate_budget([a, b], 24) == {"a": 2, "b": 1} for _ in range(5))


def test_zero_singular_values_never_taken():
    layers = [LayerSpectrum("a", (4, 4), [1.0, 0.0, 0.0]), LayerSpectrum("z", (3, 3), [0.0, 0.0])]
    assert allocate_budget(layers, 10_000) == {"a": 1, "z": 0}


def test_fills_leftover_after_first_miss():
    big = LayerSpectrum("big", (50, 50), [10.0, 9.0])  # cost 100, ratios 1.0, 0.81
    cheap = LayerSpectrum("cheap", (5, 5), [1.0, 0.9, 0.8])  # cost 10, ratios 0.1, 0.081, 0.064
    # 150: big#1 (100), big#2 does not fit, cheap units fill the remaining 50
    assert allocate_budget([big, cheap], 150) == {"big": 1, "cheap": 3}


def test_explicit_cost_and_tensor_values():
    torch = pytest.importorskip("torch")
    layer = LayerSpectrum("conv", (8, 36), torch.tensor([3.0, 2.0, 1.0]), cost=44)
    assert layer.singular_values == (3.0, 2.0, 1.0) and layer.unit_cost == 44
    assert allocate_budget([layer], 100) == {"conv": 2}
    assert uniform_rank_params([layer, LayerSpectrum("x", (2, 5), [1.0])], 3) == 3 * 44 + 2 * 7


def test_many_layers_is_fast():
    rng = random.Random(0)
    layers = [LayerSpectrum(f"l{i}", (256, 256), sorted((rng.random() for _ in range(256)), reverse=True))
              for i in range(200)]
    budget = uniform_rank_params(layers, 16)
    ranks = allocate_budget(layers, budget)
    assert _spent(layers, ranks) <= budget
    assert _retained(layers, ranks) >= _retained(layers, {x.name: 16 for x in layers})
