"""ROUGE-L near-duplicate index: bit-parallel LCS vs the textbook table, and no prefilter misses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkd.lion.dedup import InstructionIndex, instruction_id, lcs_length, normalise, rouge_l, tokens


def reference_lcs(a, b) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def reference_rouge(a: str, b: str) -> float:
    ta, tb = tokens(a), tokens(b)
    if not ta or not tb:
        return 0.0
    return 2 * reference_lcs(ta, tb) / (len(ta) + len(tb))


small_alphabet = st.lists(st.sampled_from("abcde"), max_size=40)


@settings(max_examples=500, deadline=None)
@given(small_alphabet, small_alphabet)
def test_bit_parallel_lcs_matches_reference_dp(a, b) -> None:
    assert lcs_length(a, b) == reference_lcs(a, b)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=60, max_size=120), st.lists(st.integers(0, 3), max_size=120))
def test_lcs_beyond_one_machine_word(a, b) -> None:
    assert lcs_length(a, b) == reference_lcs(a, b)


def test_rouge_l_values() -> None:
    assert rouge_l("The cat sat on the mat", "the CAT sat on the mat!") == 1.0
    # LCS("a b c d", "a c d e") = 3 -> F = 2 * 3 / 8
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("", "anything") == 0.0 and rouge_l("...", "!!!") == 0.0


def test_instruction_id_is_normalised_text_hash() -> None:
    assert instruction_id("Write  a Poem\n") == instruction_id("write a poem")
    assert instruction_id("write a poem") != instruction_id("write a poem.")
    assert len(instruction_id("x")) == 16 and normalise("  A \t B ") == "a b"


def test_index_finds_near_duplicates_and_accepts_new_ones() -> None:
    index = InstructionIndex(0.7, ["Write a short poem about autumn rain.", "Explain how a transistor works."])
    duplicate, score = index.is_duplicate("Write a short poem about the autumn rain")
    assert duplicate and score > 0.7
    assert index.nearest("write a SHORT poem about autumn rain!") == (1.0, "Write a short poem about autumn rain.")
    assert index.add_if_new("List three causes of the French Revolution.") == (True, 0.0)
    assert len(index) == 3
    added, score = index.add_if_new("List three causes of the French Revolution please")
    assert not added and score > 0.7 and len(index) == 3


def test_threshold_is_strict_greater_than() -> None:
    # F = 2 * 7 / 20 = 0.7 exactly: Lion drops only F > 0.7.
    index = InstructionIndex(0.7, ["a b c d e f g h i j"])
    assert index.is_duplicate("a b c d e f g x y z") == (False, pytest.approx(0.7))


def test_empty_and_unknown_queries() -> None:
    index = InstructionIndex(0.7)
    assert index.nearest("anything at all") == (0.0, None)
    index.add("some words here")
    assert index.nearest("???") == (0.0, None)
    assert index.nearest("completely different vocabulary") == (0.0, None)
    with pytest.raises(ValueError):
        InstructionIndex(0.0)


sentences = st.lists(st.sampled_from("the a cat dog sat ran on mat rug big"), min_size=0, max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(sentences, max_size=25), sentences, st.sampled_from([0.3, 0.5, 0.7, 0.9, 1.0]))
def test_prefilter_never_misses_a_true_duplicate(pool, query, threshold) -> None:
    index = InstructionIndex(threshold, pool)
    scores = [reference_rouge(query, text) for text in pool]
    best_true = max(scores, default=0.0)
    duplicate, _ = index.is_duplicate(query)
    assert duplicate == (best_true > threshold)
    best, text = index.nearest(query)
    if best_true > threshold:
        assert best == pytest.approx(best_true) and reference_rouge(query, text) == pytest.approx(best_true)
    else:
        assert best <= best_true + 1e-12


@settings(max_examples=100, deadline=None)
@given(st.lists(sentences, max_size=30))
def test_add_if_new_keeps_a_pool_without_near_duplicates(texts) -> None:
    index = InstructionIndex(0.7)
    kept = [t for t in texts if index.add_if_new(t)[0]]
    for i, a in enumerate(kept):
        for b in kept[:i]:
            assert reference_rouge(a, b) <= 0.7
