"""The RL loop's reward task: the last number of a reply is its answer."""
from __future__ import annotations

from asyncengine.rl.task import Problem, problems


def test_reward_reads_the_last_number() -> None:
    p = Problem(3, 5)
    assert p.question == "What is 3 + 5?"
    assert p.reward("To add 3 and 5, we get 3 + 5 = 8.") == 1.0
    assert p.reward("8") == 1.0
    # Cut off after restating the problem: the last number is an operand, scored by its distance.
    assert p.reward("To add 3 and 5, we add 3 + 5") == 0.5 / (1 + 3)
    assert p.reward("The answer is 9, not 8") == 1.0
    assert p.reward("The answer is 8, not 9") == 0.5 / 2
    assert p.reward("I can't say.") == 0.0
    assert Problem(0, 0).reward("-1") == 0.25


def test_problems_are_a_function_of_seed_and_step() -> None:
    assert problems(3, 5, seed=1) == problems(3, 5, seed=1)
    assert problems(3, 5, seed=1) != problems(4, 5, seed=1)
    assert all(0 <= q.a <= 7 and 0 <= q.b <= 7 for q in problems(0, 50, max_operand=7))
