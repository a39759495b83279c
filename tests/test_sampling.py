"""TemperatureSampler: mixing proportions, per-epoch reseeding, resumable state."""

from __future__ import annotations

import itertools

import pytest

from mtpeft.data.sampling import TemperatureSampler

SIZES = {"big": 800, "mid": 150, "small": 50}


def _task_of(index: int) -> str:
    """Global index -> task, for blocks in SIZES order."""
    return "big" if index < 800 else "mid" if index < 950 else "small"


def test_probabilities_follow_the_temperature() -> None:
    proportional = TemperatureSampler(SIZES, temperature=1.0).probabilities()
    assert proportional == pytest.approx({"big": 0.8, "mid": 0.15, "small": 0.05})
    sqrt = TemperatureSampler(SIZES, temperature=2.0).probabilities()
    total = sum(n**0.5 for n in SIZES.values())
    assert sqrt == pytest.approx({k: n**0.5 / total for k, n in SIZES.items()})
    uniform = TemperatureSampler(SIZES, temperature=1000.0).probabilities()
    assert uniform == pytest.approx({k: 1 / 3 for k in SIZES}, abs=0.01)


@pytest.mark.parametrize(("temperature", "expected"), [(1.0, (0.8, 0.15, 0.05)), (1000.0, (1 / 3,) * 3)])
def test_realised_counts_match_the_probabilities(temperature: float, expected: tuple[float, ...]) -> None:
    sampler = TemperatureSampler(SIZES, temperature=temperature, num_samples=20_000, seed=1)
    counts = {task: 0 for task in SIZES}
    for index in sampler:
        counts[_task_of(index)] += 1
    assert counts == sampler.realised_counts()
    for task, p in zip(SIZES, expected, strict=True):
        assert counts[task] / 20_000 == pytest.approx(p, abs=0.02)


def test_indices_walk_a_permutation_of_each_task() -> None:
    sampler = TemperatureSampler(SIZES, temperature=1000.0, num_samples=2000, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 2000
    small = [i for i in indices if _task_of(i) == "small"]
    # the small task is drawn ~667 times from 50 examples: it cycles its permutation
    first_pass = small[:50]
    assert sorted(first_pass) == list(range(950, 1000))
    assert small[50:100] == first_pass
    big = [i for i in indices if _task_of(i) == "big"]
    assert len(big) < 800
    assert len(set(big)) == len(big)  # fewer draws than examples: no repeats


def test_same_epoch_same_order_new_epoch_new_order() -> None:
    a, b = TemperatureSampler(SIZES, seed=7), TemperatureSampler(SIZES, seed=7)
    assert list(a) == list(b) == list(a)  # re-iterating an epoch repeats it
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(TemperatureSampler(SIZES, seed=8)) != list(TemperatureSampler(SIZES, seed=7))


def test_default_epoch_length_is_the_total_size() -> None:
    assert len(TemperatureSampler(SIZES)) == 1000
    assert len(list(TemperatureSampler(SIZES, num_samples=64))) == 64


def test_state_dict_round_trip_resumes_mid_epoch() -> None:
    sampler = TemperatureSampler(SIZES, temperature=2.0, seed=3)
    sampler.set_epoch(4)
    expected = list(sampler)
    iterator = iter(sampler)
    head = list(itertools.islice(iterator, 123))
    state = sampler.state_dict()
    assert state["epoch"] == 4 and state["position"] == 123 and state["seed"] == 3

    resumed = TemperatureSampler(SIZES, temperature=2.0, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # Lightning calls this at epoch start: same epoch keeps the position
    assert head + list(resumed) == expected
    assert list(resumed) == expected  # the next pass over the epoch starts from the beginning
    resumed.set_epoch(5)
    sampler.set_epoch(5)
    assert list(resumed) == list(sampler)


def test_state_dict_from_other_settings_is_rejected() -> None:
    state = TemperatureSampler(SIZES, temperature=2.0).state_dict()
    with pytest.raises(ValueError, match="saved temperature=2.0"):
        TemperatureSampler(SIZES, temperature=1.0).load_state_dict(state)
    with pytest.raises(ValueError, match="saved task_sizes"):
        TemperatureSampler({**SIZES, "small": 49}, 2.0, num_samples=1000).load_state_dict(state)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_invalid_temperature_errors(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        TemperatureSampler(SIZES, temperature=temperature)


def test_invalid_sizes_error() -> None:
    with pytest.raises(ValueError, match="task 'mid' has size 0"):
        TemperatureSampler({"big": 3, "mid": 0})
    with pytest.raises(ValueError, match="num_samples"):
        TemperatureSampler(SIZES, num_samples=0)


def test_caps_and_weights_shape_the_mixture() -> None:
    """``p_i ∝ w_i min(n_i, K_i)^(1/T)``: a cap counts a big task as K examples (T5's limit), a weight
    scales a task's share; neither given is plain temperature sampling."""
    capped = TemperatureSampler(SIZES, caps={"big": 150}).probabilities()
    assert capped == pytest.approx({"big": 150 / 350, "mid": 150 / 350, "small": 50 / 350})
    weighted = TemperatureSampler(SIZES, temperature=1000.0, weights={"small": 2.0}).probabilities()
    assert weighted == pytest.approx({"big": 0.25, "mid": 0.25, "small": 0.5}, abs=0.01)
    both = TemperatureSampler(SIZES, temperature=2.0, caps={"big": 100}, weights={"mid": 0.5}).probabilities()
    raw = {"big": 100**0.5, "mid": 0.5 * 150**0.5, "small": 50**0.5}
    assert both == pytest.approx({k: v / sum(raw.values()) for k, v in raw.items()})
    sampler = TemperatureSampler(SIZES, num_samples=20_000, seed=1, caps={"big": 150})
    counts = sampler.realised_counts()
    assert counts["big"] / 20_000 == pytest.approx(150 / 350, abs=0.02)
    assert (
        TemperatureSampler(SIZES, caps={"big": 5000}).probabilities()
        == TemperatureSampler(SIZES).probabilities()
    )


def test_mixing_is_part_of_the_saved_state() -> None:
    state = TemperatureSampler(SIZES, weights={"small": 2.0}).state_dict()
    with pytest.raises(ValueError, match="saved mixing=.*data.task_weights"):
        TemperatureSampler(SIZES).load_state_dict(state)
    TemperatureSampler(SIZES, weights={"small": 2.0}).load_state_dict(state)
    plain = TemperatureSampler(SIZES).state_dict()
    del plain["mixing"]  # a checkpoint from before caps and weights
    TemperatureSampler(SIZES).load_state_dict(plain)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"caps": {"huge": 10}}, "caps name 'huge', which are not tasks"),
        ({"caps": {"big": 1.5}}, r"caps\['big'\] must be a positive int"),
        ({"weights": {"big": 0}}, r"weights\['big'\] must be a positive float"),
        ({"weights": {"big": float("inf")}}, r"weights\['big'\] must be a positive float"),
    ],
)
def test_invalid_caps_and_weights_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TemperatureSampler(SIZES, **kwargs)
