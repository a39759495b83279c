"""Code: a one-line function body from a chain spec, checked by execution (docs/data.md 4.3); metric: pass@1.

``def f ( x , y ) : # take y , add 3 , multiply by x ; return :`` -> ``return ( y + 3 ) * x``.
Each record carries four test cases ``[[args...], expected]`` computed from the chain itself.
Two conflict mechanisms (docs/data.md 4.4, item 2) share one knob: literal starts (``take 5 , ...`` must
stay symbolic, ``( 5 + 3 ) * x``, while reasoning folds constants) and shared-frame items
``input : take 5 , add 3 , multiply by 2 output :`` that are word-for-word the reasoning prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mtpeft.data.records import Record, make_record
from mtpeft.data.synthetic.chain import CHAIN_OPS, Chain, random_chain, random_literal_chain, shared_frame
from mtpeft.data.synthetic.checks import check_probabilities
from mtpeft.data.synthetic.lexicon import ARG_NAMES

TASK = "code"
N_TESTS = 4
"""Test cases per record (one for zero-argument shared-frame items)."""
TEST_RANGE = (-9, 9)
"""Argument values of the test cases."""


@dataclass(frozen=True)
class CodeConfig:
    """Knobs of the code generator (defaults: docs/data.md 4.5)."""

    steps: int = 3
    """Chain steps after the start, 1..8."""
    n_args: int = 2
    """Function arguments, the first of ``x, y, z`` (1..3)."""
    ops: tuple[str, ...] = CHAIN_OPS
    """Ops the steps draw from (subset of add/sub/mul/max/mod)."""
    p_const_start: float | None = None
    """Probability that the chain starts from a literal; None means ``conflict``."""
    p_shared_frame: float | None = None
    """Probability of a shared-frame conflict item; None means ``conflict``."""
    shared_steps: int = 2
    """Steps of a shared-frame item (docs/data.md 4.3: 2)."""
    conflict: float = 0.5
    """The shared conflict knob; sets ``p_const_start`` and ``p_shared_frame`` unless given."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if not 1 <= self.steps <= 8 or not 1 <= self.shared_steps <= 8:
            raise ValueError(
                f"CodeConfig.steps={self.steps}, shared_steps={self.shared_steps} must be in 1..8"
            )
        if not 1 <= self.n_args <= len(ARG_NAMES):
            raise ValueError(f"CodeConfig.n_args={self.n_args} must be in 1..{len(ARG_NAMES)}")
        bad = [op for op in self.ops if op not in CHAIN_OPS]
        if bad or not self.ops:
            raise ValueError(
                f"CodeConfig.ops={list(self.ops)} invalid; use a non-empty subset of {list(CHAIN_OPS)}"
            )
        check_probabilities(self, ("conflict", "p_const_start", "p_shared_frame"))

    @property
    def const_start_share(self) -> float:
        """Effective probability of a literal start."""
        return self.conflict if self.p_const_start is None else self.p_const_start

    @property
    def shared_frame_share(self) -> float:
        """Effective probability of a shared-frame item."""
        return self.conflict if self.p_shared_frame is None else self.p_shared_frame


def generate(n: int, seed: int, cfg: CodeConfig | None = None) -> list[Record]:
    """Generate ``n`` code records deterministically from ``seed`` (one ``random.Random`` stream)."""
    cfg = cfg or CodeConfig()
    rng = random.Random(seed)
    return [_item(rng, cfg) for _ in range(n)]


def _item(rng: random.Random, cfg: CodeConfig) -> Record:
    """One record: a shared-frame item with probability ``shared_frame_share``, else a ``def`` item."""
    if rng.random() < cfg.shared_frame_share:
        chain = random_literal_chain(rng, cfg.shared_steps)
        return _record(chain, (), shared_frame(chain), [[[], chain.evaluate({})]], shared=True)
    args = ARG_NAMES[: cfg.n_args]
    chain = random_chain(rng, args, cfg.steps, cfg.ops, cfg.const_start_share)
    instruction = f"def f ( {' , '.join(args)} ) : # {chain.text()} ; return :"
    return _record(chain, args, instruction, _tests(rng, chain, args), shared=False)


def _tests(rng: random.Random, chain: Chain, args: tuple[str, ...]) -> list[list]:
    """``N_TESTS`` cases ``[[args...], expected]`` with arguments drawn from ``TEST_RANGE``."""
    cases = []
    for _ in range(N_TESTS):
        values = [rng.randint(*TEST_RANGE) for _ in args]
        cases.append([values, chain.evaluate(dict(zip(args, values, strict=True)))])
    return cases


def _record(chain: Chain, args: tuple[str, ...], instruction: str, tests: list[list], shared: bool) -> Record:
    """Assemble the record; the target and gold answer are both the reference ``return`` line."""
    target = f"return {chain.expression()}"
    return make_record(
        TASK,
        instruction,
        output=target,
        answer=target,
        args=list(args),
        tests=tests,
        shared_frame=shared,
        const_start=chain.start.isdigit(),
    )
