"""The simulated teacher's task world: generation, parsing, worked answers, final numbers, rarer kinds."""

import random

import pytest

from agentkd.teachers.sim.world import (
    DOMAINS,
    KINDS,
    final_number,
    make_problem,
    rarer_kind,
    sample_problems,
    solve,
    worked_answer,
)


def test_every_sampled_problem_parses_back_to_itself():
    problems = sample_problems(2000, seed=1, steps=(1, 4), digits=(1, 3))
    assert all(solve(p.text) == p for p in problems)


def test_answers_are_non_negative_ints_and_texts_distinct():
    problems = sample_problems(1500, seed=2, steps=(1, 4), digits=(1, 3))
    assert len({p.text for p in problems}) == len(problems)
    assert all(isinstance(p.answer, int) and p.answer >= 0 for p in problems)


def test_sampling_is_reproducible_by_seed():
    assert sample_problems(50, seed=7) == sample_problems(50, seed=7)
    assert sample_problems(50, seed=7) != sample_problems(50, seed=8)


def test_sampling_respects_difficulty_and_kinds():
    problems = sample_problems(300, seed=3, steps=(3, 3), digits=(2, 2), kinds=["divide", "more_than"])
    assert {p.steps for p in problems} == {3}
    assert {p.digits for p in problems} == {2}
    assert {p.kind for p in problems} == {"divide", "more_than"}


def test_common_kinds_are_drawn_more_often_than_rare_ones():
    kinds = [p.kind for p in sample_problems(3000, seed=4)]
    assert kinds.count("add") > 2 * kinds.count("divide")


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown kinds"):
        sample_problems(3, seed=0, kinds=["modulo"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_worked_answer_ends_with_the_answer(seed):
    rng = random.Random(seed)
    for problem in sample_problems(300, seed=seed, steps=(1, 4), digits=(1, 3)):
        canonical = worked_answer(problem)
        varied = worked_answer(problem, rng)
        assert final_number(canonical) == problem.answer
        assert final_number(varied) == problem.answer
        assert varied.endswith(f"The answer is {problem.answer}.")
        assert canonical.count(" = ") == problem.steps


def test_canonical_worked_answer_shape():
    problem = solve("Ann has 12 apples. Ann gets 7 more apples. Ann gives away 4 apples. How many apples does Ann have now?")
    assert problem is not None and problem.answer == 15 and problem.kind == "add" and problem.steps == 2
    assert worked_answer(problem) == "12 + 7 = 19. 19 - 4 = 15. The answer is 15."


def test_compare_and_divide_kinds_solve():
    twice = solve("Ann has 6 cards. Ben has 3 times as many cards as Ann. How many cards does Ben have now?")
    pile = solve("Kim has 84 coins. Kim puts the coins into 4 equal piles and keeps one pile. How many coins does Kim have now?")
    assert twice is not None and twice.answer == 18 and twice.kind == "times_as_many"
    assert pile is not None and pile.answer == 21 and pile.kind == "divide" and pile.digits == 2


@pytest.mark.parametrize(
    "text",
    [
        "",
        "What is the capital of France?",
        "Ann has 12 apples. How many apples does Ann have now?",  # no operation
        "Ann has 12 apples. Ann gets 7 more pens. How many apples does Ann have now?",  # item changes
        "Ann has 3 apples. Ann gives away 5 apples. How many apples does Ann have now?",  # negative
        "Ann has 7 coins. Ann puts the coins into 2 equal piles and keeps one pile. How many coins does Ann have now?",
        "Ann has 12 apples. Ann gets 7 more apples. How many apples does Ben have now?",  # wrong subject
    ],
)
def test_text_not_of_the_world_is_none(text):
    assert solve(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12 + 7 = 19. The answer is 19.", 19),
        ("the answer is 1,234.", 1234),
        ("The answer is 3. Wait, no. THE ANSWER IS 4", 4),
        ("The answer is: 42", 42),
        ("So 5 apples.", None),
        ("", None),
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_rarer_kind_stays_in_the_domain_and_is_not_more_common():
    rng = random.Random(0)
    for kind in KINDS:
        for _ in range(20):
            other = rarer_kind(kind, rng)
            assert DOMAINS[other] == DOMAINS[kind]
            assert KINDS[other] <= KINDS[kind]
    assert rarer_kind("add", rng) in {"more_than", "fewer_than", "subtract"}


def test_make_problem_keeps_kind_steps_and_digits():
    rng = random.Random(5)
    for kind in KINDS:
        problem = make_problem(rng, kind, 2, 3)
        assert solve(problem.text) == problem
        assert (problem.kind, problem.steps, problem.digits) == (kind, 2, 3)
