"""The pre-training corpus of the tiny base model and the tokenizer-training texts (docs/data.md 4.1).

PEFT needs a pre-trained base. The primitives corpus teaches the *surface* and the *skills* the
three tasks build on, without their question/answer frames (no ``question :`` / ``answer :``):

* facts with a repeat inside the window (three facts, then one of them again) -> copy / induction,
  the skill extractive QA needs; some lines resolve ``the owner of the PET`` (two-hop);
* equations and equation chains (``5 + 3 = 8 . 8 * 2 = 16 .``) -> the reasoning CoT;
* Python one-liners (``def f ( x , y ) : return ( y + 3 ) * x``) -> the code targets;
* narrative sentences (``judy has 18 cards . judy gets 5 more .``) and chain recipes
  (``take 5 , add 3 , multiply by 2 .``) -> the prompts of reasoning and code.

Every line is a space-separated string of at most ``MAX_LINE_TOKENS`` whitespace tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mtpeft.data.synthetic.chain import CHAIN_OPS, apply_op, random_chain, random_literal_chain
from mtpeft.data.synthetic.lexicon import (
    ARG_NAMES,
    EVENT_TEMPLATES,
    FACT_TEMPLATES,
    MAX_FACT_NUMBER,
    NAMES,
    OBJECTS,
    OP_SYMBOLS,
    OWNER_OF,
    PETS,
    RELATIONS,
)

MAX_LINE_TOKENS = 60
"""Upper bound on whitespace tokens per corpus line."""


def primitives_corpus(n_lines: int, seed: int) -> list[str]:
    """Return ``n_lines`` pre-training lines drawn deterministically from ``seed``.

    Line kinds and shares: facts with repeats 35 %, equations 20 %, narrative 20 %, Python 15 %,
    chain recipes 10 %. The same seed always gives the same corpus.
    """
    if n_lines < 0:
        raise ValueError(f"primitives_corpus: n_lines must be >= 0, got {n_lines}")
    rng = random.Random(seed)
    kinds: list[tuple[Callable[[random.Random], str], float]] = [
        (_facts_line, 0.35),
        (_equations_line, 0.20),
        (_narrative_line, 0.20),
        (_python_line, 0.15),
        (_recipe_line, 0.10),
    ]
    builders, weights = zip(*kinds, strict=True)
    lines = []
    for _ in range(n_lines):
        builder = rng.choices(builders, weights=weights)[0]
        lines.append(_cap(builder(rng)))
    return lines


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Texts to train the tokenizer on: a primitives sample plus records of every task generator.

    Each record contributes ``instruction + " " + output``. Generators run at several knob settings
    (both conflict extremes, two-hop QA, answer-only reasoning, 1..3 code arguments) so every word any
    task can emit is in the sample.
    """
    from mtpeft.data.synthetic import code, qa, reasoning  # lazy: generators import this package

    texts = primitives_corpus(2000, seed)
    configs = [
        (qa.generate, qa.QAConfig(conflict=0.0, hop2=0.5, n_facts=8)),
        (qa.generate, qa.QAConfig(conflict=1.0)),
        (code.generate, code.CodeConfig(conflict=0.0, n_args=3, steps=4)),
        (code.generate, code.CodeConfig(conflict=1.0, n_args=1)),
        (reasoning.generate, reasoning.ReasoningConfig(conflict=0.0, p_distractor=0.5)),
        (reasoning.generate, reasoning.ReasoningConfig(conflict=1.0, answer_only=True)),
    ]
    for i, (generate, cfg) in enumerate(configs):
        for record in generate(200, seed + 1 + i, cfg):
            texts.append(f"{record['instruction']} {record['output']}")
    return texts


def _cap(line: str) -> str:
    """Cut a line to ``MAX_LINE_TOKENS`` whitespace tokens, ending at a sentence boundary if possible."""
    words = line.split()
    if len(words) <= MAX_LINE_TOKENS:
        return line
    words = words[:MAX_LINE_TOKENS]
    ends = [i for i, w in enumerate(words) if w == "."]
    return " ".join(words[: ends[-1] + 1] if ends else words)


def _fact(rng: random.Random, person: str) -> str:
    """One random fact about ``person``: a relation or, one time in five, a count."""
    relation = rng.choice([*RELATIONS, "numeric"])
    if relation == "numeric":
        number = rng.randint(0, MAX_FACT_NUMBER)
        return FACT_TEMPLATES["numeric"].format(p=person, n=number, obj=rng.choice(OBJECTS))
    return FACT_TEMPLATES[relation].format(p=person, v=rng.choice(RELATIONS[relation]))


def _facts_line(rng: random.Random) -> str:
    """3-6 facts, then 1-2 of them repeated (copy / induction); sometimes a resolved two-hop fact."""
    if rng.random() < 0.2:
        return _two_hop_line(rng)
    people = rng.sample(NAMES, rng.randint(3, 6))
    facts = [_fact(rng, person) for person in people]
    repeats = [rng.choice(facts) for _ in range(rng.randint(1, 2))]
    return " ".join(facts + repeats)


def _two_hop_line(rng: random.Random) -> str:
    """``bob owns a cat . bob lives in rome . the owner of the cat lives in rome .``."""
    person = rng.choice(NAMES)
    pet = rng.choice(PETS)
    relation = rng.choice([r for r in RELATIONS if r != "pet"])
    value = rng.choice(RELATIONS[relation])
    owner = OWNER_OF.format(pet=pet)
    sentences = [
        FACT_TEMPLATES["pet"].format(p=person, v=pet),
        FACT_TEMPLATES[relation].format(p=person, v=value),
        FACT_TEMPLATES[relation].format(p=owner, v=value),
    ]
    return " ".join(sentences)


def _equation(rng: random.Random) -> str:
    """One equation ``a op b = c .`` with small non-negative operands."""
    op = rng.choice(["add", "add", "sub", "sub", "mul", "max", "mod"])
    if op == "mul":
        a, b = rng.randint(0, 20), rng.randint(0, 9)
    elif op == "mod":
        a, b = rng.randint(0, 30), rng.randint(2, 9)
    else:
        a, b = rng.randint(0, 30), rng.randint(0, 20)
        if op == "sub" and b > a:
            a, b = b, a
    c = apply_op(op, a, b)
    if op == "max":
        return f"max ( {a} , {b} ) = {c} ."
    return f"{a} {OP_SYMBOLS[op]} {b} = {c} ."


def _equations_line(rng: random.Random) -> str:
    """Independent equations or a chain ``5 + 3 = 8 . 8 * 2 = 16 .``."""
    if rng.random() < 0.5:
        return " ".join(_equation(rng) for _ in range(rng.randint(2, 5)))
    value = rng.randint(0, 20)
    parts = []
    for _ in range(rng.randint(2, 4)):
        op, operand = _count_event(rng, value, max_arg=9)
        new = apply_op(op, value, operand)
        parts.append(f"{value} {OP_SYMBOLS[op]} {operand} = {new} .")
        value = new
    return " ".join(parts)


def _count_event(rng: random.Random, value: int, max_arg: int) -> tuple[str, int]:
    """A count-changing event: add 1..max_arg, subtract without going below 0, or multiply by 2-3."""
    op = rng.choice(["add", "sub", "mul"])
    if op == "add":
        return op, rng.randint(1, max_arg)
    if op == "sub":
        return op, rng.randint(0, min(value, max_arg))
    return op, rng.randint(2, 3)


def _narrative_line(rng: random.Random) -> str:
    """A short story: ``judy has 18 cards . judy gets 5 more . ... judy has 20 cards .``."""
    person, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    value = rng.randint(0, 20)
    sentences = [FACT_TEMPLATES["numeric"].format(p=person, n=value, obj=obj)]
    for _ in range(rng.randint(1, 4)):
        op, operand = _count_event(rng, value, max_arg=9)
        template = rng.choice(EVENT_TEMPLATES[op])
        sentences.append(template.format(p=person, q=other, a=operand))
        value = apply_op(op, value, operand)
    if rng.random() < 0.3:
        distractor = FACT_TEMPLATES["numeric"].format(p=other, n=rng.randint(0, 20), obj=obj)
        sentences.insert(rng.randint(1, len(sentences)), distractor)
    if rng.random() < 0.5:
        sentences.append(FACT_TEMPLATES["numeric"].format(p=person, n=value, obj=obj))
    return " ".join(sentences)


def _python_line(rng: random.Random) -> str:
    """1-3 one-line Python functions ``def f ( x , y ) : return ( y + 3 ) * x``."""
    defs = []
    for name in ["f", "g", "h"][: rng.randint(1, 3)]:
        args = ARG_NAMES[: rng.randint(1, 3)]
        chain = random_chain(rng, args, rng.randint(1, 3), CHAIN_OPS, p_const_start=0.2)
        defs.append(f"def {name} ( {' , '.join(args)} ) : return {chain.expression()}")
    return " ".join(defs)


def _recipe_line(rng: random.Random) -> str:
    """1-3 chain recipes in words, ``take 5 , add 3 , multiply by 2 .`` (no results)."""
    recipes = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            chain = random_literal_chain(rng, rng.randint(1, 3))
        else:
            chain = random_chain(rng, ARG_NAMES[: rng.randint(1, 3)], rng.randint(1, 3), CHAIN_OPS, 0.3)
        recipes.append(chain.text() + " .")
    return " ".join(recipes)
