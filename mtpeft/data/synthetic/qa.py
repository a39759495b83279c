"""Extractive QA over generated facts (docs/data.md 4.3); metric: exact match of one span.

``context : bob owns a owl . erin has 19 coins . grace works as a poet . question : how many coins
does erin have ? answer :`` -> ``19``. Each person gets one fact; the question asks about one of them,
so the answer is always a span of the context. Numeric facts (``P has N OBJ``) share their surface
with the reasoning task, where the same question needs computing rather than copying: their share is
the conflict knob (docs/data.md 4.4, item 1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mtpeft.data.records import Record, make_record
from mtpeft.data.synthetic.checks import check_probabilities
from mtpeft.data.synthetic.lexicon import (
    FACT_TEMPLATES,
    MAX_FACT_NUMBER,
    NAMES,
    OBJECTS,
    OWNER_OF,
    PETS,
    QUESTION_TEMPLATES,
    RELATIONS,
)

TASK = "qa"


@dataclass(frozen=True)
class QAConfig:
    """Knobs of the QA generator (defaults: docs/data.md 4.5)."""

    n_facts: int = 3
    """Facts per context, 1..12 (one per person); all but one are distractors."""
    hop2: float = 0.0
    """Probability of a two-hop question ``where does the owner of the cat live ?``."""
    p_numeric: float | None = None
    """Share of numeric facts ``P has N OBJ .``; None means ``conflict``."""
    conflict: float = 0.5
    """The shared conflict knob; sets ``p_numeric`` unless that is given."""

    def __post_init__(self) -> None:
        if not 1 <= self.n_facts <= len(NAMES):
            raise ValueError(
                f"QAConfig.n_facts={self.n_facts} must be in 1..{len(NAMES)} (one fact per name)"
            )
        check_probabilities(self, ("hop2", "conflict", "p_numeric"))

    @property
    def numeric_share(self) -> float:
        """The effective probability that a fact is numeric."""
        return self.conflict if self.p_numeric is None else self.p_numeric


@dataclass(frozen=True)
class _Fact:
    """One fact: a person, a relation (or ``numeric``) and its value (for numeric: ``N OBJ``)."""

    person: str
    relation: str
    value: str
    obj: str = ""

    def sentence(self, subject: str | None = None) -> str:
        """The fact as a sentence, optionally about another subject (the two-hop reference)."""
        p = subject or self.person
        if self.relation == "numeric":
            return FACT_TEMPLATES["numeric"].format(p=p, n=self.value, obj=self.obj)
        return FACT_TEMPLATES[self.relation].format(p=p, v=self.value)

    def question(self, subject: str | None = None) -> str:
        """The question whose answer is this fact's value."""
        return QUESTION_TEMPLATES[self.relation].format(p=subject or self.person, obj=self.obj)


def generate(n: int, seed: int, cfg: QAConfig | None = None) -> list[Record]:
    """Generate ``n`` QA records deterministically from ``seed`` (one ``random.Random`` stream)."""
    cfg = cfg or QAConfig()
    rng = random.Random(seed)
    return [_item(rng, cfg) for _ in range(n)]


def _draw_fact(rng: random.Random, person: str, p_numeric: float) -> _Fact:
    """A numeric fact with probability ``p_numeric``, else a random relation and value."""
    if rng.random() < p_numeric:
        return _Fact(person, "numeric", str(rng.randint(0, MAX_FACT_NUMBER)), rng.choice(OBJECTS))
    relation = rng.choice(list(RELATIONS))
    return _Fact(person, relation, rng.choice(RELATIONS[relation]))


def _item(rng: random.Random, cfg: QAConfig) -> Record:
    """One record: facts about distinct people, a question about one fact, its value as the answer.

    Two-hop (probability ``hop2``): the asked fact must be a non-numeric, non-pet fact (a pet question
    about a pet owner would be ambiguous); a fact ``P owns a PET .`` with an unused pet is added and
    the question names ``the owner of the PET``. Without an eligible fact the question stays one-hop.
    """
    people = rng.sample(NAMES, cfg.n_facts)
    facts = [_draw_fact(rng, person, cfg.numeric_share) for person in people]
    want_hop = rng.random() < cfg.hop2
    eligible = [f for f in facts if f.relation not in ("numeric", "pet")]
    used_pets = {f.value for f in facts if f.relation == "pet"}
    free_pets = [p for p in PETS if p not in used_pets]
    hop = want_hop and bool(eligible) and bool(free_pets)
    target = rng.choice(eligible if hop else facts)
    sentences = [f.sentence() for f in facts]
    subject = None
    if hop:
        pet = rng.choice(free_pets)
        sentences.append(_Fact(target.person, "pet", pet).sentence())
        subject = OWNER_OF.format(pet=pet)
    rng.shuffle(sentences)
    instruction = f"context : {' '.join(sentences)} question : {target.question(subject)} answer :"
    return make_record(
        TASK,
        instruction,
        output=target.value,
        answer=target.value,
        relation=target.relation,
        numeric=target.relation == "numeric",
        hop2=hop,
        n_numeric_facts=sum(f.relation == "numeric" for f in facts),
    )
