"""A procedural reward task: small additions, answered with a number.

"What is 3 + 5?" -> reward 1.0 when the last integer of the answer is the sum (the answer
a reply ends on, as GSM8K-style graders read it), less the further off it is, 0.0 without a
number. SmolLM2-135M-Instruct restates the problem first ("To add 3 and 5, ... = 8"), so it
starts near 20% right with 32 tokens (often cut off before its answer): a reply that gets to
the point sooner scores more, which is what the learning run can teach it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

SYSTEM = "You are a calculator. Reply with the result only."
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True, slots=True)
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    def reward(self, answer: str) -> float:
        """1 for the right sum as the last number, 0.5 / (1 + its error) for a wrong one
        (a dense signal: nearer is better), 0 for none."""
        numbers = _INT.findall(answer)
        if not numbers:
            return 0.0
        error = abs(int(numbers[-1]) - (self.a + self.b))
        return 1.0 if error == 0 else 0.5 / (1 + error)


def problems(step: int, count: int, seed: int = 0, max_operand: int = 20) -> list[Problem]:
    """The step's problems (a pure function of seed and step)."""
    rng = random.Random(seed * 1_000_003 + step)
    return [Problem(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(count)]
