"""Tests for optimizer.graph.patterns, the one include/exclude name-pattern language."""

from __future__ import annotations

import re

import pytest

from optimizer.graph.patterns import NamePatterns, exact_name_pattern, invalid_pattern


def test_globs_match_the_whole_name_case_sensitively() -> None:
    patterns = NamePatterns(["layer1.*", "fc?"])
    assert patterns.matches("layer1.conv") and patterns.matches("fc2")
    assert not patterns.matches("x.layer1.conv")       # a glob is anchored at both ends
    assert not patterns.matches("FC2") and not patterns.matches("fc22")


def test_regexes_search_anywhere() -> None:
    patterns = NamePatterns(["re:attn\\.(q|k)"])
    assert patterns.matches("block3/attn.q/MatMul")
    assert not patterns.matches("block3/attn.v/MatMul")


def test_any_of_several_names_matches() -> None:
    patterns = NamePatterns(["re:^head$"])
    assert patterns.matches("weight_7", "head")
    assert not patterns.matches("weight_7", "headless")
    assert not patterns.matches()
    assert not NamePatterns([]).matches("anything")


def test_invalid_pattern_names_the_first_bad_regex() -> None:
    assert invalid_pattern(["*", "re:ok", "[glob is not a regex"]) is None
    bad = invalid_pattern(["re:ok", "re:(open", "re:[also"])
    assert bad is not None and bad.startswith("'re:(open': ")
    with pytest.raises(re.error):
        NamePatterns(["re:(open"])


@pytest.mark.parametrize("name", ["fc1.gemm", "a+b(c)*", "re:x", "node[0]"])
def test_exact_name_pattern_matches_that_name_only(name: str) -> None:
    pattern = NamePatterns([exact_name_pattern(name)])
    assert pattern.matches(name)
    assert not pattern.matches(name + "x") and not pattern.matches("x" + name)
