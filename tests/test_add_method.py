"""Adding a method is two files: a toy method, written to a temp dir as a user would write
``mtpeft/methods/toy.py`` and ``conf/method/toy.yaml``, is registered, composes, passes the whole contract
suite and trains in the methods study that sweeps the registry (README, "Add a method").

How the two files are found, as in a checkout: the module's directory is appended to
``mtpeft.methods.__path__`` (the registry searches every directory on it); the yaml is put on Hydra's
search path for a single run (``hydra.searchpath=[file://...]``), and for the studies into a copy of the
repository's ``conf/``, because Hydra expands a sweep's ``glob(*)`` over the primary config directory only
(not over ``hydra.searchpath``). Nothing else is edited: no list of methods, no test case, no matched config.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import mtpeft.methods
from mtpeft.adapters.registry import METHODS
from mtpeft.methods import available_methods, get_method, parse_method_config
from mtpeft.study.config import compose_study, load_study, sweep_jobs, sweeper_params
from tests import contract
from tests.conftest import CONF_DIR, TINY_RUN, compose_train
from tests.contract import Case

TOY = "toy"

TOY_MODULE = '''"""Toy: LoRA whose up-projection B is one per task (A shared), a method written in one file.

::

    y = W0 x + (alpha / r) · B_t A dropout(x)        t = the row's task id; B_t = 0 at init

Trainable parameters per adapted linear: ``r d_in + T r d_out``.
"""

from __future__ import annotations

import torch
from torch import nn

from mtpeft.adapters.base import AdaptedModel
from mtpeft.adapters.inject import wrap_modules
from mtpeft.adapters.lowrank import LowRankConfig, LowRankLinear, kaiming_uniform_, require_task_ids, target_shapes
from mtpeft.adapters.registry import register_method
from mtpeft.utils.schema import config_dataclass


@config_dataclass
class ToyConfig(LowRankConfig):
    """r, alpha, dropout, targets and init_weights, as every low-rank method."""


class ToyLinear(LowRankLinear):
    """``W0 x + s · B_t A dropout(x)`` with one ``B_t`` per task."""

    def __init__(self, base_layer: nn.Linear, config: ToyConfig, num_tasks: int) -> None:
        super().__init__(base_layer, config.r, config.alpha, config.dropout)
        self.toy_A = self.new_parameter(config.r, self.in_features)
        self.toy_B = self.new_parameter(num_tasks, self.out_features, config.r)
        kaiming_uniform_(self.toy_A)
        if config.init_weights:
            nn.init.zeros_(self.toy_B)
        else:
            kaiming_uniform_(self.toy_B)

    def delta(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        b = self.toy_B[require_task_ids(task_ids, "toy")]  # [batch, d_out, r]
        h = self.dropout(x.to(self.toy_A.dtype)) @ self.toy_A.T  # [batch, seq, r]
        return torch.einsum("bsr,bor->bso", h, b) * self.scaling


@register_method("toy")
class Toy(AdaptedModel):
    """A shared A and one B per task on the target linears; needs task ids."""

    config_class = ToyConfig
    requires_task_ids = True

    def adapt(self) -> None:
        cfg, tasks = self.config, self.num_tasks
        self.adapted = wrap_modules(self.base_model, cfg.targets, lambda _, lin: ToyLinear(lin, cfg, tasks))

    def task_conditioned_modules(self) -> list[nn.Module]:
        return list(self.adapted.values())

    def expected_trainable_parameters(self) -> int:
        r, tasks = self.config.r, self.num_tasks
        shapes = target_shapes(self.base_model.config, self.adapted)
        return sum(r * d_in + tasks * r * d_out for d_in, d_out in shapes)
'''

TOY_YAML = """# Toy: LoRA with one B per task (fields: ToyConfig in mtpeft/methods/toy.py).
name: toy
r: 8                # as the LoRA baseline
alpha: 16.0
dropout: 0.05
targets: [q_proj, k_proj, v_proj, o_proj]
init_weights: true  # B_t = 0: identity at init
"""

#: The toy through the contract: r = 2 on q, k, v, o of the tiny Llama (L = 2, d = 32, d_kv = 16), T = 3.
TOY_CASE = Case(
    TOY,
    {"r": 2},
    non_identity={"init_weights": False},
    bad_configs=(({"r": 0}, "r"), ({"rank": 2}, "rank"), ({"targets": []}, "targets")),
    parameters=2 * sum(2 * d_in + 3 * 2 * d_out for d_in, d_out in [(32, 32), (32, 16), (32, 16), (32, 32)]),
)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two files a user adds, in a temp dir laid out as the checkout: methods/toy.py, conf/method/toy.yaml."""
    root = tmp_path_factory.mktemp("user")
    (root / "methods").mkdir()
    (root / "methods" / f"{TOY}.py").write_text(TOY_MODULE)
    (root / "conf" / "method").mkdir(parents=True)
    (root / "conf" / "method" / f"{TOY}.yaml").write_text(TOY_YAML)
    return root


@pytest.fixture(scope="module")
def toy(user_files: Path) -> Iterator[Path]:
    """The toy registered for this module's tests, and gone afterwards (path, registry, imported module)."""
    available_methods()  # the built-in methods discovered first: a worker may start with this module
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mtpeft.methods, "__path__", [*mtpeft.methods.__path__, str(user_files / "methods")])
        patch.setattr(METHODS, "_items", dict(METHODS._items))  # the registry as it was, restored after
        try:
            yield user_files
        finally:
            sys.modules.pop(f"{mtpeft.methods.__name__}.{TOY}", None)
            GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def checkout_conf(user_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's conf/ with the user's yaml added to conf/method/ (what a study's glob sees)."""
    conf = tmp_path_factory.mktemp("checkout") / "conf"
    shutil.copytree(CONF_DIR, conf)
    shutil.copy(user_files / "conf" / "method" / f"{TOY}.yaml", conf / "method")
    return conf


def test_the_user_writes_exactly_two_files(user_files: Path) -> None:
    files = sorted(p.relative_to(user_files).as_posix() for p in user_files.rglob("*") if p.is_file())
    assert files == ["conf/method/toy.yaml", "methods/toy.py"]


def test_the_toy_is_registered_and_composes(toy: Path, tmp_path: Path) -> None:
    assert TOY in available_methods() and get_method(TOY).__module__ == f"mtpeft.methods.{TOY}"
    cfg = compose_train([f"method={TOY}", f"hydra.searchpath=[file://{toy / 'conf'}]"], tmp_path)
    options = OmegaConf.to_container(cfg.method, resolve=True)
    assert options.pop("name") == TOY
    assert parse_method_config(TOY, options) == get_method(TOY).config_class()  # the yaml = the defaults


def test_the_toy_passes_the_contract(toy: Path, tmp_path: Path) -> None:
    results = contract.run_contract(TOY_CASE, tmp_path)
    assert set(results) == set(contract.CHECKS)
    skipped = {name: why for name, why in results.items() if why != "passed"}
    assert skipped == {
        "aux_loss_gradients_survive_gradient_checkpointing": "skipped: toy-default has no auxiliary loss"
    }


def test_the_methods_studies_sweep_the_toy(toy: Path, checkout_conf: Path) -> None:
    """The studies list no method: their ``method: glob(*)`` finds the new yaml, one job per seed."""
    registry = available_methods()
    for name in ("methods_mix3", "methods_mix3_tuned"):
        study = load_study(name, conf_dir=checkout_conf)
        assert study.methods == registry, name
    jobs = sweep_jobs(sweeper_params(compose_study("methods_mix3", conf_dir=checkout_conf)), checkout_conf)
    assert sorted({job[0] for job in jobs if job[0].startswith("method=")}) == [
        f"method={m}" for m in registry
    ]
    assert len(jobs) == len(registry) * 3  # x seeds 0, 1, 2


def _multirun(conf: Path, overrides: list[str], root: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """``python -m mtpeft.train -cp <conf> -m <overrides>`` in this process (where the toy is registered);
    the results.json of every job."""
    from mtpeft import train

    monkeypatch.setenv("MTPEFT_ROOT", str(root))
    monkeypatch.setattr(
        sys, "argv", ["mtpeft.train", "-cp", str(conf), "-m", *overrides, *TINY_RUN, "logger=none"]
    )
    try:
        train.main()
    except SystemExit as exit_:  # the sweep summary exits non-zero when a job failed
        assert exit_.code in (0, None), f"the sweep failed (exit {exit_.code})"
    finally:
        GlobalHydra.instance().clear()
    return [json.loads(p.read_text()) for p in sorted((root / "logs").rglob("results.json"))]


def test_the_toy_trains_in_the_methods_study(
    toy: Path, checkout_conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The methods_mix3 study's toy job (its glob narrowed to the toy, one seed) trains and is recorded."""
    runs = _multirun(
        checkout_conf, ["experiment=methods_mix3", f"method=glob({TOY})", "seed=0"], tmp_path, monkeypatch
    )
    (run,) = runs
    assert run["status"] == "success" and run["method"] == TOY
    assert run["trainable_params"] > 0


@pytest.mark.slow
def test_the_whole_registry_sweep_includes_the_toy(
    toy: Path, checkout_conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """methods_mix3 as declared (``method: glob(*)``), one seed: every registered method, the toy included."""
    runs = _multirun(checkout_conf, ["experiment=methods_mix3", "seed=0"], tmp_path, monkeypatch)
    assert sorted(r["method"] for r in runs) == available_methods()
    assert {r["status"] for r in runs} == {"success"}
