"""Reasoning: multi-step word problems with a chain of thought ending in ``#### N`` (docs/data.md 4.3).

``problem : judy has 18 cards . judy gets 5 more . judy gives 3 to bob . question : how many cards
does judy have ? answer :`` -> ``18 + 5 = 23 . 23 - 3 = 20 . #### 20``; metric: the number after
``####``. Conflict (docs/data.md 4.4): steps phrased as chain specs (``add 5 .``) and shared-frame items
``input : take 5 , add 3 , multiply by 2 output :`` whose code twin must stay symbolic while this task
folds the constants.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mtpeft.data.records import Record, make_record
from mtpeft.data.synthetic.chain import Chain, apply_op, random_literal_chain, shared_frame
from mtpeft.data.synthetic.checks import check_probabilities
from mtpeft.data.synthetic.lexicon import (
    CHAIN_PHRASES,
    EVENT_TEMPLATES,
    FACT_TEMPLATES,
    NAMES,
    OBJECTS,
    OP_SYMBOLS,
    QUESTION_TEMPLATES,
)

TASK = "reasoning"
REASONING_OPS: tuple[str, ...] = ("add", "sub", "mul")
"""Events a story step may use: gain, loss (never below zero), multiply by 2 or 3."""


@dataclass(frozen=True)
class ReasoningConfig:
    """Knobs of the reasoning generator (defaults: docs/data.md 4.5)."""

    steps: int = 2
    """Events after the opening sentence, 1..8."""
    max_start: int = 20
    """Start count drawn from 0..max_start (also the range of distractor counts)."""
    max_arg: int = 9
    """Largest operand of a gain or loss."""
    ops: tuple[str, ...] = REASONING_OPS
    """Events the steps draw from (subset of add/sub/mul)."""
    p_distractor: float = 0.0
    """Probability of a distractor sentence ``Q has N OBJ .``."""
    answer_only: bool = False
    """Drop the chain of thought: the target is just ``#### N``."""
    p_chain: float | None = None
    """Per-step probability of chain phrasing (``add 5 .``); None means ``conflict``."""
    p_shared_frame: float | None = None
    """Probability of a shared-frame conflict item; None means ``conflict``."""
    shared_steps: int = 2
    """Steps of a shared-frame item (docs/data.md 4.3: 2)."""
    conflict: float = 0.5
    """The shared conflict knob; sets ``p_chain`` and ``p_shared_frame`` unless given."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if not 1 <= self.steps <= 8 or not 1 <= self.shared_steps <= 8:
            raise ValueError(
                f"ReasoningConfig.steps={self.steps}, shared_steps={self.shared_steps} must be in 1..8"
            )
        if self.max_start < 0 or self.max_arg < 1:
            raise ValueError(
                f"ReasoningConfig needs max_start >= 0 and max_arg >= 1, got {self.max_start}, {self.max_arg}"
            )
        bad = [op for op in self.ops if op not in REASONING_OPS]
        if bad or not self.ops:
            raise ValueError(
                f"ReasoningConfig.ops={list(self.ops)} invalid; use a non-empty subset of {list(REASONING_OPS)}"
            )
        check_probabilities(self, ("p_distractor", "conflict", "p_chain", "p_shared_frame"))

    @property
    def chain_share(self) -> float:
        """Effective per-step probability of chain phrasing."""
        return self.conflict if self.p_chain is None else self.p_chain

    @property
    def shared_frame_share(self) -> float:
        """Effective probability of a shared-frame item."""
        return self.conflict if self.p_shared_frame is None else self.p_shared_frame


def generate(n: int, seed: int, cfg: ReasoningConfig | None = None) -> list[Record]:
    """Generate ``n`` reasoning records deterministically from ``seed`` (one ``random.Random`` stream)."""
    cfg = cfg or ReasoningConfig()
    rng = random.Random(seed)
    return [_item(rng, cfg) for _ in range(n)]


def equation(value: int, op: str, operand: int) -> tuple[str, int]:
    """One CoT step ``v op a = v' .`` and the new value."""
    new = apply_op(op, value, operand)
    return f"{value} {OP_SYMBOLS[op]} {operand} = {new} .", new


def _target(cot: list[str], value: int, answer_only: bool) -> str:
    """The CoT followed by ``#### N`` (or just ``#### N``)."""
    final = f"#### {value}"
    return final if answer_only or not cot else f"{' '.join(cot)} {final}"


def _item(rng: random.Random, cfg: ReasoningConfig) -> Record:
    """A shared-frame item with probability ``shared_frame_share``, else a word problem."""
    if rng.random() < cfg.shared_frame_share:
        return _shared_item(random_literal_chain(rng, cfg.shared_steps), cfg)
    return _story_item(rng, cfg)


def _shared_item(chain: Chain, cfg: ReasoningConfig) -> Record:
    """The reasoning reading of a literal chain: fold the constants step by step."""
    value = int(chain.start)
    cot = []
    for op, operand in chain.steps:
        line, value = equation(value, op, int(operand))
        cot.append(line)
    output = _target(cot, value, cfg.answer_only)
    return make_record(TASK, shared_frame(chain), output, str(value), shared_frame=True, n_chain_steps=0)


def _event(rng: random.Random, value: int, cfg: ReasoningConfig) -> tuple[str, int]:
    """Draw one event: gain 1..max_arg, loss 0..min(value, max_arg), or multiply by 2 or 3."""
    op = rng.choice(cfg.ops)
    if op == "add":
        return op, rng.randint(1, cfg.max_arg)
    if op == "sub":
        return op, rng.randint(0, min(value, cfg.max_arg))
    return op, rng.randint(2, 3)


def _story_item(rng: random.Random, cfg: ReasoningConfig) -> Record:
    """A word problem about person P (and a second person Q) counting one object."""
    person, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    value = rng.randint(0, cfg.max_start)
    sentences = [FACT_TEMPLATES["numeric"].format(p=person, n=value, obj=obj)]
    cot = []
    n_chain = 0
    for _ in range(cfg.steps):
        op, operand = _event(rng, value, cfg)
        if rng.random() < cfg.chain_share:
            sentences.append(CHAIN_PHRASES[op].format(a=operand) + " .")
            n_chain += 1
        else:
            sentences.append(rng.choice(EVENT_TEMPLATES[op]).format(p=person, q=other, a=operand))
        line, value = equation(value, op, operand)
        cot.append(line)
    distractor = rng.random() < cfg.p_distractor
    if distractor:
        count = rng.randint(0, cfg.max_start)
        position = rng.randint(1, len(sentences))
        sentences.insert(position, FACT_TEMPLATES["numeric"].format(p=other, n=count, obj=obj))
    question = QUESTION_TEMPLATES["numeric"].format(p=person, obj=obj)
    instruction = f"problem : {' '.join(sentences)} question : {question} answer :"
    output = _target(cot, value, cfg.answer_only)
    return make_record(
        TASK,
        instruction,
        output,
        str(value),
        shared_frame=False,
        n_chain_steps=n_chain,
        distractor=distractor,
    )
