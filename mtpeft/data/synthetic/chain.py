"""Chain specs: ``take y , add 3 , multiply by x`` and their symbolic and numeric readings.

A chain is a start value followed by steps ``(op, operand)``. The same chain is read three ways:
as words (the code prompt and the chain-phrased reasoning steps), as a nested Python expression
(the code target ``return ( y + 3 ) * x``, docs/data.md 4.3) and as a value (code test outputs,
reasoning CoT). Expressions are evaluated here by walking the chain, never with ``eval``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from mtpeft.data.synthetic.lexicon import CHAIN_PHRASES, CHAIN_START

CHAIN_OPS: tuple[str, ...] = ("add", "sub", "mul", "max", "mod")
"""Every op a chain step may use."""

EXPRESSION_TEMPLATES: MappingProxyType[str, str] = MappingProxyType(
    {
        "add": "( {e} + {a} )",
        "sub": "( {e} - {a} )",
        "mul": "( {e} * {a} )",
        "max": "max ( {e} , {a} )",
        "mod": "( {e} % {a} )",
    }
)
"""How each op wraps the expression built so far (``{e}``) with its operand (``{a}``)."""


@dataclass(frozen=True)
class Chain:
    """A start term and a sequence of ``(op, operand)`` steps; terms are argument names or digits."""

    start: str
    steps: tuple[tuple[str, str], ...]

    def text(self) -> str:
        """The spoken spec, e.g. ``take y , add 3 , multiply by x``."""
        parts = [CHAIN_START.format(a=self.start)]
        parts += [CHAIN_PHRASES[op].format(a=operand) for op, operand in self.steps]
        return " , ".join(parts)

    def expression(self) -> str:
        """The nested Python expression with one redundant outer pair of parentheses dropped."""
        expr = self.start
        for op, operand in self.steps:
            expr = EXPRESSION_TEMPLATES[op].format(e=expr, a=operand)
        if self.steps and expr.startswith("( ") and expr.endswith(" )"):
            expr = expr[2:-2]
        return expr

    def evaluate(self, env: Mapping[str, int]) -> int:
        """The value of the chain with argument values ``env`` (Python semantics for ``%``)."""
        value = _term(self.start, env)
        for op, operand in self.steps:
            value = apply_op(op, value, _term(operand, env))
        return value

    def uses(self) -> set[str]:
        """The argument names the chain reads."""
        terms = [self.start, *(operand for _, operand in self.steps)]
        return {t for t in terms if not t.lstrip("-").isdigit()}


def apply_op(op: str, left: int, right: int) -> int:
    """Apply one chain op to two integers."""
    if op == "add":
        return left + right
    if op == "sub":
        return left - right
    if op == "mul":
        return left * right
    if op == "max":
        return max(left, right)
    if op == "mod":
        return left % right
    raise ValueError(f"unknown chain op {op!r}; valid ops: {', '.join(CHAIN_OPS)}")


def _term(term: str, env: Mapping[str, int]) -> int:
    """Resolve a term: an integer literal or an argument looked up in ``env``."""
    if term.lstrip("-").isdigit():
        return int(term)
    if term not in env:
        raise KeyError(f"chain term {term!r} has no value; pass it in env (got {sorted(env)})")
    return env[term]


def random_chain(
    rng: random.Random,
    args: Sequence[str],
    n_steps: int,
    ops: Sequence[str],
    p_const_start: float,
) -> Chain:
    """Draw a chain over ``args`` (docs/data.md 4.3, code task).

    The chain starts from an argument, or with probability ``p_const_start`` from a literal 1..9.
    Each step draws an op from ``ops`` and an operand that is an argument or a literal 0..9 (equal
    odds); a ``mod`` divisor is always a literal 2..9 so it is never zero (and ``% 1`` is not trivial).
    """
    unknown = [op for op in ops if op not in CHAIN_OPS]
    if unknown or not ops:
        raise ValueError(f"chain ops {list(ops)} invalid; choose a non-empty subset of {list(CHAIN_OPS)}")
    const_start = not args or rng.random() < p_const_start
    start = str(rng.randint(1, 9)) if const_start else rng.choice(list(args))
    steps = []
    for _ in range(n_steps):
        op = rng.choice(list(ops))
        if op == "mod":
            operand = str(rng.randint(2, 9))
        elif args and rng.random() < 0.5:
            operand = rng.choice(list(args))
        else:
            operand = str(rng.randint(0, 9))
        steps.append((op, operand))
    return Chain(start, tuple(steps))


def random_literal_chain(rng: random.Random, n_steps: int) -> Chain:
    """Draw the shared-frame conflict chain (docs/data.md 4.3): literal start 1..9, add/sub 1..9 or mul 2..3.

    Subtraction never takes the running value below zero, so the reasoning reading of the same chain
    stays a valid count.
    """
    value = rng.randint(1, 9)
    chain_start = str(value)
    steps = []
    for _ in range(n_steps):
        choices = ["add", "mul"] + (["sub"] if value >= 1 else [])
        op = rng.choice(choices)
        if op == "mul":
            operand = rng.randint(2, 3)
        elif op == "sub":
            operand = rng.randint(1, min(value, 9))
        else:
            operand = rng.randint(1, 9)
        value = apply_op(op, value, operand)
        steps.append((op, str(operand)))
    return Chain(chain_start, tuple(steps))


def shared_frame(chain: Chain) -> str:
    """The neutral prompt used by both code and reasoning conflict items (docs/data.md 4.4, item 2)."""
    return f"input : {chain.text()} output :"
