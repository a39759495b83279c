"""The shared word lists and phrase templates of the procedural tasks (docs/data.md section 4.3).

One lexicon feeds the pre-training corpus (``primitives.py``) and the three task generators
(``qa.py``, ``code.py``, ``reasoning.py``), so a base model pre-trained on the primitives already
knows the surface of every task. Everything here is an immutable constant: tuples and read-only
mappings. All phrases are lower-case and space-separated so they tokenise word by word.
"""

from __future__ import annotations

from types import MappingProxyType

NAMES: tuple[str, ...] = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "oscar",
)
"""Twelve person names; QA draws people without replacement, so ``n_facts`` is at most 12."""

CITIES: tuple[str, ...] = ("paris", "london", "rome", "tokyo", "berlin", "madrid", "cairo", "lima")
PETS: tuple[str, ...] = ("cat", "dog", "owl", "fish", "horse", "rabbit", "parrot", "turtle")
COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
JOBS: tuple[str, ...] = ("poet", "doctor", "baker", "farmer", "pilot", "teacher", "singer", "nurse")

OBJECTS: tuple[str, ...] = ("cards", "coins", "apples", "books", "pens", "stamps", "marbles", "shells")
"""Eight plural object nouns, shared by QA numeric facts and the reasoning word problems."""

MAX_FACT_NUMBER = 20
"""Numeric QA facts ``P has N OBJ .`` use N in 0..20."""

RELATIONS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {"city": CITIES, "pet": PETS, "color": COLORS, "job": JOBS}
)
"""The four non-numeric relations of QA and their eight values each."""

FACT_TEMPLATES: MappingProxyType[str, str] = MappingProxyType(
    {
        "city": "{p} lives in {v} .",
        "pet": "{p} owns a {v} .",
        "color": "{p} likes the color {v} .",
        "job": "{p} works as a {v} .",
        "numeric": "{p} has {n} {obj} .",
    }
)
"""One declarative sentence per relation; ``{p}`` may also be ``the owner of the PET`` (two-hop)."""

QUESTION_TEMPLATES: MappingProxyType[str, str] = MappingProxyType(
    {
        "city": "where does {p} live ?",
        "pet": "what does {p} own ?",
        "color": "what color does {p} like ?",
        "job": "what is the job of {p} ?",
        "numeric": "how many {obj} does {p} have ?",
    }
)
"""The question asked about each relation (QA) and about the final count (reasoning)."""

OWNER_OF = "the owner of the {pet}"
"""Two-hop reference to a person through the pet they own."""

EVENT_TEMPLATES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "add": ("{p} gets {a} more .", "{p} finds {a} more ."),
        "sub": ("{p} gives {a} to {q} .", "{p} loses {a} ."),
        "mul": ("{p} gets {a} times as many .",),
    }
)
"""Story phrasing of the reasoning events (``+``, ``-``, ``*``)."""

CHAIN_PHRASES: MappingProxyType[str, str] = MappingProxyType(
    {
        "add": "add {a}",
        "sub": "subtract {a}",
        "mul": "multiply by {a}",
        "max": "take the max with {a}",
        "mod": "take the remainder by {a}",
    }
)
"""Chain-spec phrasing shared by the code task and the chain-phrased reasoning steps."""

CHAIN_START = "take {a}"
"""First element of every chain spec: ``take x`` or ``take 5``."""

ARG_NAMES: tuple[str, ...] = ("x", "y", "z")
"""Function argument names of the code task; ``n_args`` takes the first ones."""

OP_SYMBOLS: MappingProxyType[str, str] = MappingProxyType({"add": "+", "sub": "-", "mul": "*", "mod": "%"})
"""Infix symbol of each binary arithmetic op (``max`` is written as a call)."""


def vocabulary() -> tuple[str, ...]:
    """Every word of the lexicon and templates (not numbers), for vocabulary coverage checks."""
    words: set[str] = set(NAMES) | set(OBJECTS) | set(ARG_NAMES) | set(OP_SYMBOLS.values())
    for values in RELATIONS.values():
        words.update(values)
    templates = [*FACT_TEMPLATES.values(), *QUESTION_TEMPLATES.values(), OWNER_OF, CHAIN_START]
    templates += [t for group in EVENT_TEMPLATES.values() for t in group] + list(CHAIN_PHRASES.values())
    for template in templates:
        words.update(w for w in template.split() if not w.startswith("{"))
    return tuple(sorted(words))
