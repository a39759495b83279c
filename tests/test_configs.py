"""Every config composes, and bad names or keys fail with a message naming them (configs tested like code)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtpeft.methods import available_methods, get_method, parse_method_config
from mtpeft.preflight import preflight
from mtpeft.run import method_options
from tests.conftest import CONF_DIR, compose_train
from tests.data_sources_util import alpaca_rows, write_json


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_method_config_matches_a_registered_method() -> None:
    assert sorted(_options("method")) == sorted(available_methods())


@pytest.mark.parametrize("method", _options("method"))
def test_method_configs_parse_into_their_dataclass(method: str, tmp_path: Path) -> None:
    cfg = compose_train([f"method={method}"], tmp_path)
    name, options = method_options(cfg)
    assert name == method
    parse_method_config(name, options)


PLUGINS = {
    "hparams_search": ("hydra_plugins.hydra_optuna_sweeper",),
    "launcher": ("hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher"),
}
"""Groups whose options need a Hydra plugin (the ``sweeps`` extra)."""


@pytest.mark.parametrize(
    "group",
    [
        "method",
        "model",
        "data",
        "trainer",
        "logger",
        "debug",
        "experiment",
        "hparams_search",
        "launcher",
        "matched",
    ],
)
def test_every_option_of_every_group_composes_and_passes_preflight(group: str, tmp_path: Path) -> None:
    """Every shipped option composes, declares every top-level key it sets and passes the pre-flight checks
    (``mtpeft.preflight``) as shipped, so a config error is never the user's first discovery."""
    for plugin in PLUGINS.get(group, ()):
        pytest.importorskip(plugin)
    data = write_json(tmp_path / "data" / "a.json", alpaca_rows(20))
    for option in _options(group):
        extra = [f"data.paths=[{data}]"] if (group, option) == ("data", "files") else []
        preflight(compose_train([f"{group}={option}", *extra], tmp_path))


@pytest.mark.parametrize("trainer", ["default", "cpu"])
def test_trainer_configs_instantiate(trainer: str, tmp_path: Path) -> None:
    cfg = compose_train([f"trainer={trainer}", "logger=none"], tmp_path)
    assert (
        instantiate(cfg.trainer, logger=False, enable_progress_bar=False).max_steps == cfg.trainer.max_steps
    )


def test_default_run_is_hycam_on_mix3(tmp_path: Path) -> None:
    cfg = compose_train([], tmp_path)
    assert cfg.data.tasks.keys() == {"qa", "code", "reasoning"}
    assert cfg.model.kind == "tiny" and cfg.model.arch == "llama"
    assert cfg.method.name in available_methods()


@pytest.mark.parametrize(
    ("override", "expected"),
    [("method=nope", "lora"), ("model=nope", "tiny_llama"), ("data=nope", "mix3")],
)
def test_unknown_group_option_lists_valid_ones(override: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match=expected):
        compose_train([override], tmp_path)


def test_plus_experiment_is_refused_by_hydra(tmp_path: Path) -> None:
    """``+experiment=...`` would add a second ``experiment`` entry (it is in the defaults list as null):
    Hydra refuses it naming the group, and ``experiment=...`` is the way to pick one."""
    with pytest.raises(ConfigCompositionException, match=r"Multiple values for experiment"):
        compose_train(["+experiment=methods_mix3"], tmp_path)


def test_misspelled_method_key_names_key_and_valid_keys(tmp_path: Path) -> None:
    cfg = compose_train(["method=lora", "+method.rank=4"], tmp_path)
    name, options = method_options(cfg)
    with pytest.raises(
        ValueError,
        match=r"unknown key method\.rank: .*valid keys: alpha, dropout.*\(conf/method/lora\.yaml\)",
    ):
        parse_method_config(name, options)


@pytest.mark.parametrize("method", _options("method"))
def test_method_yaml_states_exactly_the_config_defaults(method: str) -> None:
    """conf/method/<name>.yaml never drifts from its config class: it sets every field, each to the default
    (presets that change values live in subfolders such as conf/method/moe_lora/)."""
    values = yaml.safe_load((CONF_DIR / "method" / f"{method}.yaml").read_text())
    config_class = get_method(values.pop("name")).config_class
    assert values == dataclasses.asdict(config_class())


@pytest.mark.parametrize("variant", _options("matched"))
def test_param_matched_variants_within_ten_percent_of_lora_r16(variant: str, tmp_path: Path) -> None:
    from mtpeft.methods import build_method
    from tests.conftest import tiny_preset_shape

    reference = build_method("lora", {"r": 16}, tiny_preset_shape(), num_tasks=3).count_parameters()[0]
    name, options = method_options(compose_train([f"matched={variant}"], tmp_path))
    count = build_method(name, options, tiny_preset_shape(), num_tasks=3).count_parameters()[0]
    assert abs(count - reference) <= 0.1 * reference, f"{variant}: {count} vs LoRA r=16 {reference}"


def test_param_matched_study_sweeps_every_matched_config() -> None:
    """``methods_param_matched`` sweeps every ``conf/matched/*.yaml`` (``glob(*)``), each of which selects a
    registered method. A matched config is optional: a method without one is reported as not matched (a
    warning in the test summary), not a failure."""
    import warnings

    import yaml

    from mtpeft.study.config import compose_study, sweep_values

    params = compose_study("methods_param_matched").hydra.sweeper.params
    swept = sweep_values("matched", params.matched)
    assert swept == _options("matched")
    methods = {
        yaml.safe_load((CONF_DIR / "matched" / f"{v}.yaml").read_text())["defaults"][0]["override /method"]
        for v in swept
    }
    assert methods <= set(available_methods()), f"matched configs of unknown methods: {methods}"
    unmatched = sorted(set(available_methods()) - methods)
    if unmatched:
        warnings.warn(f"not matched (no conf/matched/<name>.yaml): {', '.join(unmatched)}", stacklevel=1)


@pytest.mark.parametrize("search", [o for o in _options("hparams_search") if o.endswith("_optuna")])
def test_optuna_search_spaces_name_real_keys_and_valid_values(search: str, tmp_path: Path) -> None:
    """Every swept key exists, and every choice (or interval end) of a method key builds a valid config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    spec = yaml.safe_load((CONF_DIR / "hparams_search" / f"{search}.yaml").read_text())
    method = next(d["override /method"] for d in spec["defaults"] if "override /method" in d)
    assert spec["optimized_metric"] == "val/avg/score"
    cfg = compose_train([f"method={method}"], tmp_path)
    parser = OverridesParser.create()
    for key, sweep in spec["hydra"]["sweeper"]["params"].items():
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{search}: no key {key}"
        value = parser.parse_overrides([f"{key}={sweep}"])[0].value()
        candidates = getattr(value, "list", None) or [value.start, value.end]
        if not key.startswith("method."):
            continue
        for candidate in candidates:
            name, options = method_options(cfg)
            node = options
            *parents, leaf = key.split(".")[1:]
            for part in parents:
                node = node[part]
            node[leaf] = candidate
            parse_method_config(name, options)
