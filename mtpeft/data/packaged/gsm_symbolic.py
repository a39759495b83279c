"""GSM-symbolic: GSM8K-style word problems from ``reasoning-gym``'s procedural generator, as a train/eval
reasoning task.

``pip install -e '.[reasoning-gym]'`` (``reasoning-gym==0.1.25``, Apache-2.0; works offline). The
generator instantiates 85 GSM8K-derived templates with new names and numbers, so there is unlimited
training data; each item has a question, a chain of thought ending in ``#### N`` and the answer N.
Splits are disjoint like the built-in generators' (val/test drop instructions already in train).
Usage: ``'data.tasks.gsm_symbolic={train: 2000, val: 100, test: 300}'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mtpeft.data.records import Record
from mtpeft.data.tasks import generator_task, register_task

INSTALL = "pip install -e '.[reasoning-gym]'  (reasoning-gym==0.1.25)"


@dataclass(frozen=True)
class GSMSymbolicConfig:
    """Knobs of the ``gsm_symbolic`` task."""

    cot: bool = True
    """Train on the chain of thought ending in ``#### N`` (True) or on ``#### N`` alone (False)."""


def to_record(item: Mapping[str, Any], cot: bool = True) -> Record:
    """One reasoning-gym item as a record; the gold answer is the final number."""
    answer = str(item["answer"]).strip()
    chain = str(item.get("metadata", {}).get("answer_cot") or "").strip()
    if not cot or not chain:
        output = f"#### {answer}"
    else:
        output = chain if "####" in chain else f"{chain}\n#### {answer}"
    return Record(
        task="gsm_symbolic", instruction=item["question"], input="", output=output, answer=answer, meta={}
    )


def generate(n: int, seed: int, cfg: GSMSymbolicConfig) -> list[Record]:
    """``n`` problems from ``reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)``."""
    if n == 0:
        return []
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(f"task 'gsm_symbolic' needs the reasoning-gym package: {INSTALL}") from err
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed % 2**31)
    return [to_record(item, cfg.cot) for item in dataset]


register_task(
    generator_task(
        "gsm_symbolic",
        generate,
        GSMSymbolicConfig,
        ("numeric_match",),
        256,
        "GSM8K-style word problems from reasoning-gym (needs the reasoning-gym extra)",
    )
)
