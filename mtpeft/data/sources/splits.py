"""Splitting loaded records: seeded ratio splits (HyCAM's exact index split), limits, de-duplication.

``ratio_split_indices`` reproduces DeepSpeed-Chat's ``get_raw_dataset_split_index`` as HyCAM uses it
(docs/data.md 3.2): ``np.random.RandomState(seed).shuffle`` of ``arange(n)`` (uint32), cut at cumulative
rounded boundaries ``round(r_i / sum(r) * n)`` shifted so that the last one is ``n``. With ratios
``7,2`` and seed 2333 this is HyCAM's per-file train/eval split, index for index.

Two ratios give ``train`` and one eval part that serves as both ``val`` and ``test`` (HyCAM evaluates
on its eval part); three ratios give ``train``/``val``/``test``. Eval records whose prompt
(``instruction`` and ``input``) equals a train record's are dropped by ``drop_seen_prompts``, which
returns how many so the caller can log them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np

from mtpeft.data.records import Record
from mtpeft.data.seeding import derive_seed

EVAL_SPLITS: tuple[str, ...] = ("val", "test")
"""Splits that are de-duplicated against ``train``."""


def ratio_boundaries(ratios: Sequence[float], n: int) -> list[int]:
    """Cut points ``[0, b_1, ..., n]`` exactly as DeepSpeed-Chat computes them (banker's rounding)."""
    total = sum(ratios)
    bounds = [0]
    for i, ratio in enumerate(ratios):
        bounds.append(bounds[i] + int(round(ratio / total * float(n))))
    diff = bounds[-1] - n
    for i in range(1, len(bounds)):
        bounds[i] -= diff
    return bounds


def shuffled_indices(n: int, seed: int) -> np.ndarray:
    """``arange(n)`` shuffled in place by ``np.random.RandomState(seed)`` (uint32, as DeepSpeed-Chat)."""
    dtype = np.uint32 if n < np.iinfo(np.uint32).max - 1 else np.int64
    indices = np.arange(n, dtype=dtype)
    np.random.RandomState(seed).shuffle(indices)
    return indices


def ratio_split_indices(n: int, ratios: Sequence[float], seed: int) -> list[list[int]]:
    """One index list per ratio: consecutive slices of the seeded permutation of ``range(n)``."""
    bounds = ratio_boundaries(ratios, n)
    perm = shuffled_indices(n, seed)
    return [perm[bounds[i] : bounds[i + 1]].tolist() for i in range(len(ratios))]


def ratio_split(records: Sequence[Record], ratios: Sequence[float], seed: int) -> dict[str, list[Record]]:
    """``{train, val, test}`` from one pool; with two ratios ``val`` and ``test`` are the same eval part."""
    parts = [[records[i] for i in idx] for idx in ratio_split_indices(len(records), ratios, seed)]
    if len(parts) == 2:
        return {"train": parts[0], "val": parts[1], "test": list(parts[1])}
    return dict(zip(("train", "val", "test"), parts, strict=True))


def requested_splits(ratios: Sequence[float]) -> tuple[str, ...]:
    """The splits a ratio split is asked to fill (a zero ratio asks for an empty split)."""
    if len(ratios) == 2:
        return ("train", "val", "test") if ratios[1] > 0 else ("train",)
    return tuple(s for s, r in zip(("train", "val", "test"), ratios, strict=True) if r > 0)


def take(records: list[Record], n: int | None, seed: int, *parts: object) -> list[Record]:
    """A seeded random subset of ``n`` records in their original order (all when ``n`` is None or larger)."""
    if n is None or n >= len(records):
        return records
    chosen = sorted(random.Random(derive_seed(seed, "limit", *parts)).sample(range(len(records)), n))
    return [records[i] for i in chosen]


def prompt_key(record: Mapping[str, str]) -> tuple[str, str]:
    """What makes two prompts equal: the instruction and the input (any template renders them alike)."""
    return record["instruction"], record["input"]


def drop_seen_prompts(splits: dict[str, list[Record]]) -> dict[str, int]:
    """Remove val/test records whose prompt occurs in train (in place); return the count per split."""
    seen = {prompt_key(r) for r in splits.get("train", [])}
    dropped: dict[str, int] = {}
    for split in EVAL_SPLITS:
        records = splits.get(split, [])
        kept = [r for r in records if prompt_key(r) not in seen]
        dropped[split] = len(records) - len(kept)
        splits[split] = kept
    return dropped
