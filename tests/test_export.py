"""``python -m mtpeft.export``: merged standalone models per task (logits equal to the adapted model for
that task) for the weight-delta methods, a clear refusal for input-dependent ones, and the plain
base + adapter pair that transformers + peft load for LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtpeft.adapters.base import NotMergeableError
from mtpeft.export import EXPORT_INFO, load_run, main, read_run_config
from mtpeft.methods import available_methods, build_method
from mtpeft.models.loader import load_base_model
from mtpeft.run import method_options
from tests.conftest import TINY_RUN, compose_train, make_tiny_base

REPO = Path(__file__).resolve().parent.parent
TASKS = ["code", "qa", "reasoning"]  # task ids are positions in sorted order
MERGEABLE = ["lora", "multilora", "mtl_lora", "poly", "cpoly", "moe_lora/moelora"]
NOT_MERGEABLE = ["hycam", "moe_lora", "peml"]  # moe_lora: the default token routers (gate_input=token)
#: Overrides giving each method a non-trivial update (identity-at-init methods would merge to the base).
NON_IDENTITY = {
    "lora": ["method.init_weights=false"],
    "multilora": ["method.init_weights=false"],
    "mtl_lora": ["method.init_weights=false"],
    "poly": ["method.init_weights=false", "method.n_splits=2"],
    "cpoly": ["method.init_weights=false", "method.n_splits=2"],
    "hycam": ["method.init_weights=false"],
    "moe_lora": [],
    "moe_lora/moelora": [],
    "peml": [],
}


def make_run(method: str, root: Path) -> tuple[Path, torch.nn.Module]:
    """A run directory as `python -m mtpeft.train` leaves it (config, results, adapter), without training:
    the adapter is a random non-identity one, perturbed so that every task differs."""
    run_dir = root / f"run-{method}"
    cfg = compose_train([*TINY_RUN, f"method={method}", *NON_IDENTITY[method]], run_dir)
    base, _ = load_base_model(cfg.model)
    name, options = method_options(cfg)
    torch.manual_seed(0)
    model = build_method(name, options, base, num_tasks=len(TASKS)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / "results.json").write_text(json.dumps({"status": "success", "tasks": TASKS}))
    model.save_adapter(run_dir / "adapter")
    return run_dir, model


def _inputs() -> torch.Tensor:
    return torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_model_gives_the_adapted_logits_of_its_task(method: str, tmp_path: Path) -> None:
    run_dir, model = make_run(method, tmp_path)
    out = tmp_path / "out"
    assert main([str(run_dir), "--merge", "--task", "qa", "--task", "reasoning", "--out", str(out)]) == 0
    ids = _inputs()
    plain, _ = load_base_model(OmegaConf.load(run_dir / ".hydra" / "config.yaml").model)
    with torch.no_grad():
        base_logits = plain(input_ids=ids).logits
        for task in ("qa", "reasoning"):
            merged = AutoModelForCausalLM.from_pretrained(out / f"merged-{task}", dtype=torch.float32).eval()
            task_ids = torch.full((ids.shape[0],), TASKS.index(task))
            expected = model(input_ids=ids, task_ids=task_ids).logits
            got = merged(input_ids=ids).logits
            torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5)
            assert (got - base_logits).abs().max() > 1e-3  # the merged update is not nothing
    info = json.loads((out / "merged-qa" / EXPORT_INFO).read_text())
    assert (
        info["task"] == "qa" and info["task_id"] == 1 and info["method"] == method.split("/")[0]
    )  # a preset records its method
    assert AutoTokenizer.from_pretrained(out / "merged-qa")("a b")["input_ids"]


@pytest.mark.parametrize("method", ["mtl_lora", "cpoly", "moe_lora/moelora"])
def test_task_conditioned_merges_differ_per_task(method: str, tmp_path: Path) -> None:
    run_dir, _ = make_run(method, tmp_path)
    out = tmp_path / "out"
    assert main([str(run_dir), "--merge", "--out", str(out)]) == 0  # every task
    ids = _inputs()
    logits = {}
    for task in TASKS:
        merged = AutoModelForCausalLM.from_pretrained(out / f"merged-{task}", dtype=torch.float32).eval()
        with torch.no_grad():
            logits[task] = merged(input_ids=ids).logits
    assert not torch.allclose(logits["qa"], logits["code"], atol=1e-4)


@pytest.mark.parametrize("method", NOT_MERGEABLE)
def test_input_dependent_methods_are_refused(
    method: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, model = make_run(method, tmp_path)
    with pytest.raises(NotMergeableError, match="cannot be merged"):
        model.merged_weight_deltas(0)

    def no_second_base(self):
        raise AssertionError("a refused merge must not load a second copy of the base")

    monkeypatch.setattr("mtpeft.export.LoadedRun.fresh_base", no_second_base)
    assert main([str(run_dir), "--merge", "--task", "qa", "--out", str(tmp_path / "out")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "out" / "merged-qa").exists()


def test_cli_refusal_exits_non_zero(tmp_path: Path) -> None:
    run_dir, _ = make_run("hycam", tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mtpeft.export", str(run_dir), "--task", "qa", "--merge"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "'hycam' cannot be merged" in proc.stderr


def test_base_and_peft_adapter_load_with_plain_tools(tmp_path: Path) -> None:
    run_dir, model = make_run("lora", tmp_path)
    out = tmp_path / "out"
    assert main([str(run_dir), "--out", str(out)]) == 0
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    auto_model = AutoPeftModelForCausalLM.from_pretrained(out / "adapter", dtype=torch.float32).eval()
    assert Path(auto_model.peft_config["default"].base_model_name_or_path) == (out / "base").resolve()
    ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits)
        torch.testing.assert_close(auto_model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_export_loads_the_base_in_the_dtype_the_run_trained_with(tmp_path: Path) -> None:
    """``bfloat16_if_native`` resolves per machine; the run's recorded dtype (results.json) decides."""
    run_dir, _ = make_run("lora", tmp_path)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    base, tokenizer = load_base_model(cfg.model)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    cfg.model = OmegaConf.merge(
        OmegaConf.load(REPO / "conf" / "model" / "local_dir.yaml"),
        {"name_or_path": str(tmp_path / "base"), "dtype": "bfloat16_if_native"},
    )
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    for trained, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        results = {"status": "success", "tasks": TASKS, "inputs": {"base": {"dtype": trained}}}
        (run_dir / "results.json").write_text(json.dumps(results))
        assert read_run_config(run_dir).model.dtype == trained
        assert next(load_run(run_dir).model.base_model.parameters()).dtype == dtype


def test_unknown_task_and_missing_adapter_are_clear_errors(tmp_path: Path, capsys) -> None:
    run_dir, _ = make_run("lora", tmp_path)
    assert main([str(run_dir), "--merge", "--task", "nope", "--out", str(tmp_path / "o")]) == 1
    assert "task 'nope'" in capsys.readouterr().err
    assert main([str(tmp_path), "--merge"]) == 1
    assert "no adapter/ directory" in capsys.readouterr().err


@pytest.mark.parametrize("method", available_methods())
def test_every_method_merges_exactly_or_refuses(method: str) -> None:
    """Registry-wide: a method either merges to its own logits for every task, or says it cannot."""
    options = {"lora": {"r": 4}, "peml": {"lora": {"r": 4}}}.get(method, {})
    model = build_method(method, options, make_tiny_base(), num_tasks=2).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    ids = _inputs() % 128
    for task_id in range(2):
        try:
            merged = model.merge_into(make_tiny_base(), task_id).eval()
        except NotMergeableError:
            assert method not in MERGEABLE and not model.mergeable
            return
        with torch.no_grad():
            expected = model(input_ids=ids, task_ids=torch.full((2,), task_id)).logits
            torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0.0, atol=1e-5)
    assert method in MERGEABLE and model.mergeable


def _perturbed(method: str, options: dict, num_tasks: int = 2) -> torch.nn.Module:
    """``method`` on the tiny base, every trainable parameter moved off its init (a non-trivial update)."""
    model = build_method(method, options, make_tiny_base(), num_tasks=num_tasks).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.mark.parametrize(
    "options",
    [
        {"gate_input": "task"},  # a MOELoRA-style variant: task gate, top-2 of 4, renormalised
        {"gate_input": "task", "top_k": 4, "expert_rank": "r/E", "expert_init": "normal"},  # MOELoRA
    ],
    ids=["task-gate-top2", "moelora"],
)
def test_moe_lora_task_gate_merges_to_its_logits_per_task(options: dict) -> None:
    """The task gate's update ``s Σ_e g_e(t) B_e A_e`` depends on the task alone: W0 + ΔW_t gives the
    adapted logits of task t, and the tasks' merged models differ."""
    model = _perturbed("moe_lora", options, num_tasks=3)
    assert model.mergeable
    model.check_mergeable()
    ids = _inputs() % 128
    logits = []
    for task_id in range(3):
        merged = model.merge_into(make_tiny_base(), task_id).eval()
        with torch.no_grad():
            expected = model(input_ids=ids, task_ids=torch.full((2,), task_id)).logits
            logits.append(merged(input_ids=ids).logits)
        torch.testing.assert_close(logits[-1], expected, rtol=0.0, atol=1e-5)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)


def test_moe_lora_token_routers_are_refused_naming_the_gate() -> None:
    model = _perturbed("moe_lora", {})  # gate_input=token (the default)
    assert not model.mergeable
    for refuse in (model.check_mergeable, lambda: model.merged_weight_deltas(0)):
        with pytest.raises(NotMergeableError, match=r"'moe_lora' cannot be merged.*gate_input=token"):
            refuse()


def test_bf16_merge_rounds_the_sum_once() -> None:
    """A bf16 weight becomes round(W0 + ΔW), not round(W0 + round(ΔW)) (ΔW computed in fp32)."""
    model = _perturbed("lora", {"r": 4, "init_weights": False})
    deltas = model.merged_weight_deltas(0)
    base = make_tiny_base().to(torch.bfloat16)
    before = {name: base.get_submodule(name).weight.detach().clone() for name in deltas}
    model.merge_into(base, 0)
    for name, delta in deltas.items():
        expected = (before[name].float() + delta.float()).to(torch.bfloat16)
        assert torch.equal(base.get_submodule(name).weight, expected), name
