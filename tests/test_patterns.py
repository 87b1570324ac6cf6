"""Bounded regex matching (lowrank_tools.io.patterns): PEFT's semantics kept exactly, pathological patterns refused."""

from __future__ import annotations

import re
import time

import pytest
from peft.utils.other import get_pattern_key

from lowrank_tools.errors import AdapterFormatError, InvalidOption
from lowrank_tools.io.patterns import check_pattern, peft_key_matches, peft_pattern_value, safe_search

NAMES = ["model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj", "q_proj", "self_attn.q_proj",
         "model.layers.10.self_attn.q_proj", "model.layersX0.self_attn.q_proj", "x.q_proj.y", "xq_proj",
         "unet.down_blocks.0.attentions.0.proj_in", "proj_in", "a\nb.q_proj", "q_proj\n", ""]
KEYS = ["q_proj", "^q_proj", "self_attn.q_proj", re.escape("model.layers.0.self_attn.q_proj"),
        "^" + re.escape("layers.0.self_attn.q_proj"), "model.layers.0.self_attn.q_proj",
        r"layers\.\d+\.self_attn\.q_proj", ".*q_proj", "(q|k)_proj", "proj_in", r"\d\.self_attn\.q_proj",
        "attentions\\.0\\.proj_in", "q_pro", "", "a)|(?:b", "["]


def _peft(key: str, name: str) -> bool:
    """What PEFT does: get_pattern_key returns the first key that matches, else the name itself."""
    try:
        return get_pattern_key([key], name) == key and re.match(rf"(.*\.)?({key})$", name) is not None
    except re.error:
        return False  # PEFT raises; we match nothing


@pytest.mark.parametrize("key", KEYS)
def test_peft_semantics_kept(key):
    for name in NAMES:
        assert peft_key_matches(key, name) == _peft(key, name), (key, name)


def test_first_matching_key_wins_as_in_peft():
    patterns = {"v_proj": 1, r"layers\.0\..*": 2, "q_proj": 3}
    assert peft_pattern_value(patterns, "model.layers.0.self_attn.q_proj", 9) == 2
    assert peft_pattern_value(patterns, "model.layers.1.self_attn.q_proj", 9) == 3
    assert peft_pattern_value(patterns, "lm_head", 9) == 9


EXPONENTIAL = ["([a-z0-9_.]|[a-z0-9_.])*Z", "(a+)+$", "(a*)*b", "(a|aa)*c", "(a?)*x", "(.*a)*x", "(\\w|\\w\\d)+!",
               "(a+){2,}"]


@pytest.mark.parametrize("pattern", EXPONENTIAL)
def test_exponential_patterns_are_refused(pattern):
    with pytest.raises(InvalidOption, match="exponential"):
        check_pattern(pattern, "--include")
    with pytest.raises(AdapterFormatError, match="rank_pattern key"):
        peft_key_matches(pattern, "model.layers.0.self_attn.q_proj", error=AdapterFormatError)


def test_the_refused_pattern_really_is_slow_in_re():
    """The control: what is refused above does blow up in re (22 characters take a visible fraction of a second,
    each one more doubles it), so the refusal is not of a harmless pattern."""
    start = time.perf_counter()
    re.match(r"(.*\.)?(([a-z0-9_.]|[a-z0-9_.])*Z)$", "a" * 20)
    t20 = time.perf_counter() - start
    start = time.perf_counter()
    re.match(r"(.*\.)?(([a-z0-9_.]|[a-z0-9_.])*Z)$", "a" * 12)
    t12 = time.perf_counter() - start
    assert t20 > 20 * t12


@pytest.mark.parametrize("pattern", ["attn", r"layers\.\d+\.", ".*attn.*", "(q|k|v)_proj$", "^model\\.",
                                     "(?:ab|cd)*x", r"(\d{1,3}\.){3}", "[a-z_]+\\.[0-9]+", "(?i)ATTN", "mlp|attn"])
def test_ordinary_patterns_are_accepted_and_fast(pattern):
    check_pattern(pattern, "--include")
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(200)] + ["x" * 150]
    start = time.perf_counter()
    hits = [safe_search([pattern], n) for n in names]
    assert time.perf_counter() - start < 2
    assert hits == [re.search(pattern, n) is not None for n in names]


def test_star_chains_and_long_patterns_are_refused():
    with pytest.raises(InvalidOption, match="4 unbounded repeats"):
        check_pattern(".*.*.*.*x", "--exclude")
    with pytest.raises(InvalidOption, match="characters long"):
        check_pattern("a" * 1001, "--include")
    with pytest.raises(InvalidOption, match="back-reference"):
        check_pattern(r"(a)\1", "--include")


def test_work_bound_applies_to_long_names():
    """Three stars are accepted, but not on a name long enough to make them slow: the error names both."""
    check_pattern("[a.]*[a.]*[a.]*Z", "--include")
    assert safe_search(["[a.]*[a.]*[a.]*Z"], "a" * 40) is False
    with pytest.raises(InvalidOption, match="300-character name"):
        safe_search(["[a.]*[a.]*[a.]*Z"], "a" * 300, what="--include")
