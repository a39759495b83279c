"""Length-grouped batching: same draws as plain temperature sampling, batches of similar length, resumable."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from mtpeft.data.collate import padding_fraction
from mtpeft.data.sampling import TemperatureSampler, group_by_length

SIZES = {"big": 800, "mid": 150, "small": 50}
BATCH = 16


def _lengths(seed: int = 0) -> list[int]:
    """Per-example lengths with task-dependent ranges that overlap (like mix3's tasks)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(10, 60, (800,), generator=gen), torch.randint(20, 40, (150,), generator=gen)]
    parts.append(torch.randint(30, 90, (50,), generator=gen))
    return torch.cat(parts).tolist()


def _task_of(index: int) -> str:
    return "big" if index < 800 else "mid" if index < 950 else "small"


def _pair(temperature: float = 2.0, num_samples: int | None = 1000, pool: int = 4, seed: int = 3):
    plain = TemperatureSampler(SIZES, temperature, num_samples, seed)
    grouped = TemperatureSampler(
        SIZES, temperature, num_samples, seed, lengths=_lengths(), batch_size=BATCH, pool_batches=pool
    )
    return plain, grouped


@pytest.mark.parametrize(("temperature", "num_samples"), [(1.0, None), (2.0, 1000), (50.0, 2003)])
def test_grouping_draws_exactly_the_same_examples(temperature: float, num_samples: int | None) -> None:
    plain, grouped = _pair(temperature, num_samples)
    for epoch in range(3):
        plain.set_epoch(epoch)
        grouped.set_epoch(epoch)
        a, b = list(plain), list(grouped)
        assert a != b  # the order changed ...
        assert Counter(a) == Counter(b)  # ... the multiset of draws did not
        counts = Counter(_task_of(i) for i in b)
        assert (
            counts == Counter(_task_of(i) for i in a) == grouped.realised_counts() == plain.realised_counts()
        )


def test_batches_hold_similar_lengths_and_padding_drops() -> None:
    lengths = _lengths()
    plain, grouped = _pair(pool=8)
    stream, order = list(plain), list(grouped)
    for start in range(0, len(order), BATCH):
        chunk_lengths = [lengths[i] for i in order[start : start + BATCH]]
        assert chunk_lengths == sorted(chunk_lengths)  # one length-sorted run per DataLoader batch
    before = padding_fraction([lengths[i] for i in stream], BATCH)
    after = padding_fraction([lengths[i] for i in order], BATCH)
    assert after < before / 3, (before, after)


def test_each_batch_comes_from_one_pool_of_the_stream() -> None:
    lengths = torch.tensor(_lengths())[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    order = group_by_length(lengths, BATCH, 4, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(1000))
    pools = [{p // (4 * BATCH) for p in chunk.tolist()} for chunk in order.split(BATCH)]
    assert all(len(p) == 1 for p in pools)
    assert [min(p) for p in pools] != sorted(min(p) for p in pools)  # batch order shuffled


def test_a_partial_batch_stays_last() -> None:
    lengths = torch.tensor([5, 1, 4, 2, 3, 9, 7])
    order = group_by_length(lengths, batch_size=3, pool_batches=2, gen=torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(7))
    assert order[-1].item() == 6  # the last pool holds only position 6: the partial batch, kept last
    assert sorted(order[:6].tolist()) == list(range(6))
    assert {tuple(order[:3].tolist()), tuple(order[3:6].tolist())} == {(1, 3, 4), (2, 0, 5)}


def test_grouped_state_round_trips_mid_epoch() -> None:
    _, sampler = _pair()
    sampler.set_epoch(2)
    expected = list(sampler)
    head = list(itertools.islice(iter(sampler), 5 * BATCH))
    state = sampler.state_dict()
    assert state["position"] == 5 * BATCH
    assert state["length_grouping"] == {"batch_size": BATCH, "pool_batches": 4}
    _, resumed = _pair(seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert head + list(resumed) == expected


def test_state_of_other_grouping_is_rejected() -> None:
    plain, grouped = _pair()
    with pytest.raises(ValueError, match="saved length_grouping=None .*data.group_by_length"):
        grouped.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="saved length_grouping="):
        plain.load_state_dict(grouped.state_dict())
    _, other_pool = _pair(pool=2)
    with pytest.raises(ValueError, match="pool_batches"):
        other_pool.load_state_dict(grouped.state_dict())
    old = {k: v for k, v in plain.state_dict().items() if k != "length_grouping"}  # before grouping existed
    plain.load_state_dict(old)


def test_grouping_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="got 3 lengths for 1000 examples"):
        TemperatureSampler(SIZES, lengths=[1, 2, 3], batch_size=4)
    with pytest.raises(ValueError, match="pool_batches must be an int >= 1"):
        TemperatureSampler(SIZES, lengths=_lengths(), batch_size=4, pool_batches=0)


def test_padding_fraction() -> None:
    assert padding_fraction([2, 4, 3, 3], 2) == pytest.approx(1 - 12 / 14)
    assert padding_fraction([5, 5, 5], 2) == 0.0 and padding_fraction([], 4) == 0.0
