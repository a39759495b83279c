"""Pre-flight checks (`mtpeft.preflight`): every bad input fails before any model is loaded, naming the
key (or file) and the fix; the CLI ends a failure with one ``Error: <message>`` line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig

import mtpeft.models.identity
import mtpeft.run
from mtpeft.models.cache import cache_root, check_cache_dir
from mtpeft.preflight import (
    CONF_DIR,
    NODE_SCHEMAS,
    OPTIONAL_TOP_LEVEL,
    RunSettings,
    allowed_top_level_keys,
    check_evaluation,
    error_line,
    preflight,
)
from tests.conftest import TINY_RUN, compose_train
from tests.data_sources_util import alpaca_rows, write_json

REPO = Path(__file__).resolve().parent.parent


def _cfg(overrides: list[str], tmp_path: Path) -> DictConfig:
    return compose_train(overrides, tmp_path / "run")


def _files_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    data = write_json(tmp_path / "data" / "a.json", alpaca_rows(20))
    return _cfg(["data=files", f"data.paths=[{data}]", *overrides], tmp_path)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model fail loudly, so a test sees that an error came before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the config error was reported")

    monkeypatch.setattr(mtpeft.run, "load_base_model", refuse)
    monkeypatch.setattr(mtpeft.models.identity, "base_identity", refuse)  # a job's inputs name its base


# -- top-level keys ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["+seeed=1", "++seeed=1", "+seeed.inner=1"])
def test_unknown_top_level_key_is_rejected_naming_the_valid_ones(
    override: str, tmp_path: Path, no_model: None
) -> None:
    cfg = _cfg([override], tmp_path)
    with pytest.raises(ValueError, match=r"unknown top-level key 'seeed' \(did you mean 'seed'\?\)") as err:
        mtpeft.run.run(cfg, tmp_path)
    assert "valid top-level keys: " in str(err.value) and ", seed, " in str(err.value)


def test_allowed_top_level_keys_come_from_the_config_files(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "train.yaml").write_text(
        "defaults:\n  - _self_\n  - method: lora\n  - optional local: default\nseed: 0\n"
    )
    (conf / "experiment" / "study.yaml").write_text("# @package _global_\ndefaults: []\nstudy_knob: 1\n")
    (conf / "experiment" / "plain.yaml").write_text("not_global: 1\n")
    assert allowed_top_level_keys(conf) == {"seed", "method", "local", "study_knob", *OPTIONAL_TOP_LEVEL}


def test_keys_that_configs_add_or_read_are_allowed(tmp_path: Path) -> None:
    allowed = allowed_top_level_keys()
    assert {"ablation", "optimized_metric", "cluster", "seed", "evaluation"} <= allowed  # experiment, search
    read = set()
    for path in CONF_DIR.rglob("*.yaml"):
        read |= set(re.findall(r"oc\.select:([A-Za-z_]+)", path.read_text()))
    assert read <= allowed, "a key that a config reads with oc.select must be settable"
    preflight(_cfg(["+cluster.partition=debug"], tmp_path))


# -- run settings and declared nodes ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=abc", r"seed='abc' is not valid: Input should be a valid integer \(conf/train\.yaml\)"),
        ("seed=1.5", r"seed=1\.5 is not valid"),
        ("test=maybe", r"test='maybe' is not valid: Input should be a valid boolean"),
        (
            "+evaluation.temprature=1",
            r"unknown key evaluation\.temprature: .*\(did you mean 'temperature'\?\)",
        ),
        (
            "+scheduler.warmup=0.1",
            r"unknown key scheduler\.warmup: it is not an argument of .*get_cosine_with_min_lr_schedule_with_warmup",
        ),
        ("warmup_ratio=1.5", r"warmup_ratio=1\.5 is not valid: Input should be less than 1"),
        (
            "checkpoint_every_n_steps=0",
            r"checkpoint_every_n_steps=0 is not valid: .*greater than or equal to 1",
        ),
        ("+optimizer.lrr=1", r"unknown key optimizer\.lrr \(did you mean 'lr'\?\).*torch\.optim\.AdamW"),
        ("+trainer.ckpt_path=x.ckpt", r"unknown key trainer\.ckpt_path: it is not an argument of .*Trainer"),
        (
            "+data.tasks.qa.confilct=1",
            r"unknown key data\.tasks\.qa\.confilct: .*\(did you mean 'conflict'\?\)",
        ),
        ("data.tasks.qa.val=-1", r"data\.tasks\.qa\.val=-1 is not valid"),
        ("+data.tasks.nope.train=3", r"unknown task 'nope'"),
        ("+data.batchsize=3", r"unknown key data\.batchsize \(did you mean 'batch_size'\?\)"),
        ("data.batch_size=true", r"data\.batch_size=True is not valid: .*integer"),
        (
            "data.overlength=drop",
            r"data\.overlength='drop' is not valid: Input should be 'truncate' or 'skip'",
        ),
        ("+model.hiden_size=64", r"unknown key model\.hiden_size: .*\(did you mean 'hidden_size'\?\)"),
        ("model.kind=gguf", r"model\.kind='gguf' is not valid: use one of 'tiny', 'hub'"),
        ("model.pretrain.steps=-1", r"model\.pretrain\.steps=-1 is not valid"),
        ("+model.pretrain.step=1", r"unknown key model\.pretrain\.step: .*valid keys: batch_size"),
        ("+method.prompt=1", r"unknown key method\.prompt: 'prompt' is not an option of method"),
        (
            "+data.task_weights={qaa: 2}",
            r"data\.task_weights: 'qaa' is not a task of this mixture; tasks: code",
        ),
        ("+data.task_caps={qa: 0}", r"data\.task_caps\.qa=0 is not valid"),
    ],
)
def test_bad_settings_name_the_key(override: str, message: str, tmp_path: Path, no_model: None) -> None:
    with pytest.raises(ValueError, match=message):
        mtpeft.run.run(_cfg([override], tmp_path), tmp_path)


def test_sweep_job_reports_config_errors_before_naming_its_base(tmp_path: Path, no_model: None) -> None:
    """A sweep job looks for a finished run of itself first, which needs its base (maybe built first): the
    config error still comes before that."""
    from mtpeft.train import _job

    cfg = _cfg(["method=lora", "+method.rnak=4", "skip_finished=true"], tmp_path)
    with pytest.raises(ValueError, match=r"unknown key.*'rnak'"):
        _job(cfg, tmp_path / "run", multirun=False)


def test_single_run_reports_config_errors_before_the_heavy_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single run checks its config before it imports `mtpeft.run` (torch, Lightning, transformers: ~5 s),
    so a misspelled top-level key fails in about a second."""
    from mtpeft.train import _job

    monkeypatch.setitem(sys.modules, "mtpeft.run", None)  # importing it now raises ImportError
    cfg = _cfg(["+seeed=1"], tmp_path)
    with pytest.raises(ValueError, match=r"unknown top-level key 'seeed'"):
        _job(cfg, tmp_path / "run", multirun=False)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_misspelled_method_key_fails_before_the_model_is_loaded(tmp_path: Path, no_model: None) -> None:
    cfg = _cfg(["method=lora", "+method.rnak=4"], tmp_path)
    with pytest.raises(ValueError, match=r"unknown key.*'rnak'.*valid keys: alpha"):
        mtpeft.run.run(cfg, tmp_path)
    with pytest.raises((TypeError, ValueError), match=r"method\.r"):
        preflight(_cfg(["method=lora", "method.r=four"], tmp_path))


# -- evaluation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"num_samples": 4, "temperature": 0}, "evaluation.temperature"),
        ({"num_samples": 4, "temperature": -0.5}, "evaluation.temperature"),
        ({"num_samples": 4, "top_p": 0.0}, "evaluation.top_p"),
        ({"num_samples": 4, "top_p": 1.5}, "evaluation.top_p"),
        ({"num_samples": 0}, "evaluation.num_samples"),
        ({"batch_size": 0}, "evaluation.batch_size"),
        ({"max_new_tokens": 0}, "evaluation.max_new_tokens"),
    ],
)
def test_bad_evaluation_settings_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}="):
        check_evaluation({"batch_size": 8, **options})


def test_every_plain_node_of_train_yaml_has_a_schema_with_its_keys() -> None:
    """A node of conf/train.yaml that is not a ``_target_`` node is checked by a schema of exactly its keys, so
    a new key or node cannot go unchecked and the schema cannot drift from the file."""
    train = yaml.safe_load((CONF_DIR / "train.yaml").read_text())
    plain = {k for k, v in train.items() if isinstance(v, dict) and "_target_" not in v}
    assert plain == set(NODE_SCHEMAS)
    for node, schema in NODE_SCHEMAS.items():
        assert set(train[node]) == set(schema.model_fields), node
    scalars = {k for k, v in train.items() if not isinstance(v, dict | list) and k != "defaults"}
    assert set(RunSettings.model_fields) <= scalars | {"gradient_checkpointing"}


def test_files_source_settings_fail_before_the_model(tmp_path: Path, no_model: None) -> None:
    with pytest.raises(ValueError, match=r"data\.limit\.val=0 is not valid: .*greater than or equal to 1"):
        mtpeft.run.run(_files_cfg(tmp_path, "data.limit={val:0}"), tmp_path)
    with pytest.raises(ValueError, match=r"data\.ratios: ratios must be 2 numbers"):
        preflight(_files_cfg(tmp_path, "data.ratios=[1]"))


def test_greedy_evaluation_ignores_temperature(tmp_path: Path, no_model: None) -> None:
    check_evaluation({"num_samples": 1, "temperature": 0, "top_p": 0})
    cfg = _cfg(["evaluation.num_samples=3", "evaluation.temperature=0"], tmp_path)
    with pytest.raises(
        ValueError, match=r"evaluation\.temperature=0 is not valid with evaluation\.num_samples=3"
    ):
        mtpeft.run.run(cfg, tmp_path)


# -- cache directory --------------------------------------------------------------------------------
def test_cache_dir_that_is_a_file_names_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model: None
) -> None:
    file = tmp_path / "not_a_dir"
    file.write_text("x")
    monkeypatch.setenv("MTPEFT_CACHE_DIR", str(file))
    with pytest.raises(NotADirectoryError, match=r"is a file; .*cache dir setting \$MTPEFT_CACHE_DIR"):
        mtpeft.run.run(_cfg([], tmp_path), tmp_path)
    with pytest.raises(NotADirectoryError, match=r"MTPEFT_CACHE_DIR"):
        cache_root()
    monkeypatch.setenv("MTPEFT_CACHE_DIR", str(file / "sub"))
    with pytest.raises(NotADirectoryError, match=r"lies under .*not_a_dir, which is a file"):
        check_cache_dir()
    with pytest.raises(NotADirectoryError, match=r"cache dir argument \(model\.cache_dir\)"):
        check_cache_dir(file)
    monkeypatch.setenv("MTPEFT_CACHE_DIR", str(tmp_path / "new" / "cache"))
    assert check_cache_dir() == tmp_path / "new" / "cache" and not (tmp_path / "new").exists()


# -- data -------------------------------------------------------------------------------------------
def test_zero_eval_ratios_fail_before_training_naming_data_ratios(tmp_path: Path, no_model: None) -> None:
    cfg = _files_cfg(tmp_path, "data.ratios=[1,0,0]")
    with pytest.raises(ValueError, match=r"no task has val and test records .*data\.ratios=\[1, 0, 0\]"):
        mtpeft.run.run(cfg, tmp_path)
    with pytest.raises(ValueError, match=r"no task has test records \(test=true .*data\.ratios=\[8, 1, 0\]"):
        preflight(_files_cfg(tmp_path, "data.ratios=[8,1,0]"))
    preflight(_files_cfg(tmp_path, "data.ratios=[8,1,0]", "test=false"))
    preflight(_files_cfg(tmp_path, "data.ratios=[7,2]"))


def test_generator_tasks_without_test_records_are_named(tmp_path: Path) -> None:
    tests = [f"data.tasks.{t}.test=0" for t in ("qa", "code", "reasoning")]
    with pytest.raises(
        ValueError, match=r"no task has test records.*data\.tasks\.qa\.test=0, data\.tasks\.code"
    ):
        preflight(_cfg(tests, tmp_path))
    preflight(_cfg([*tests[:2]], tmp_path))  # one task with test records is enough


def test_data_file_errors_come_before_the_model(tmp_path: Path, no_model: None) -> None:
    (tmp_path / "folder").mkdir()
    cfg = _cfg(["data=files", f"data.paths=[{tmp_path / 'folder'}]"], tmp_path)
    with pytest.raises(IsADirectoryError, match=r"data file '.*folder' is a directory"):
        mtpeft.run.run(cfg, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data file 'nope\.json' not found"):
        preflight(_cfg(["data=files", "data.paths=[nope.json]"], tmp_path))
    (tmp_path / "latin.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(
        ValueError, match=r"latin\.jsonl line 1: byte 0xe9 at byte offset 20 \(byte 21 of the line\)"
    ):
        mtpeft.run.run(_cfg(["data=files", f"data.paths=[{tmp_path / 'latin.jsonl'}]"], tmp_path), tmp_path)
    with pytest.raises(ValueError, match=r"data\.paths is not set"):
        preflight(_cfg(["data=files"], tmp_path))
    sources = '+data.sources={s: {files: ["' + str(tmp_path / "folder") + '"]}}'
    with pytest.raises(IsADirectoryError, match=r"is a directory"):
        preflight(_cfg([sources], tmp_path))


def test_evaluation_only_task_trains_on_the_others_and_is_scored(tmp_path: Path) -> None:
    """``data.tasks.<t>.train=0``: the task is never sampled for training but scored on val and test."""
    results = mtpeft.run.run(
        compose_train([*TINY_RUN, "method=lora", "logger=none", "data.tasks.qa.train=0"], tmp_path), tmp_path
    )
    assert results["tasks"] == ["code", "qa", "reasoning"]
    for split in ("val", "test"):
        assert f"{split}/qa/score" in results["metrics"][split]


# -- CLI --------------------------------------------------------------------------------------------
def _cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtpeft.train", *args, "logger=none"],
        cwd=REPO,
        env={**os.environ, "MTPEFT_ROOT": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("full", [False, True])
def test_cli_error_ends_with_one_error_line(full: bool, tmp_path: Path) -> None:
    proc = _cli(["+seeed=1"], tmp_path, **({"HYDRA_FULL_ERROR": "1"} if full else {}))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: unknown top-level key 'seeed' (did you mean 'seed'?)"), proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and ("hydra/_internal" in proc.stderr) == full
    record = json.loads(next((tmp_path / "logs").rglob("results.json")).read_text())
    assert record["status"] == "failed" and "seeed" in record["error"]


def test_error_line_is_one_line() -> None:
    assert error_line(ValueError("first\n  second\tthird")) == "Error: first second third"
    assert error_line(KeyError()) == "Error: KeyError"
