"""Tests of the base-model layer: tokenizer, tiny models, pre-training, cache, loader, model configs.

Everything writes under pytest tmp dirs (``cache_dir=tmp_path``) and pre-trains for a few steps only.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from mtpeft.data.synthetic.primitives import primitives_corpus, tokenizer_corpus
from mtpeft.methods import available_methods, build_method
from mtpeft.models import loader as loader_module
from mtpeft.models.cache import MANIFEST, get_or_build, key_hash, read_manifest
from mtpeft.models.config import HubModelSpec, TinyModelSpec, parse_model
from mtpeft.models.loader import (
    ModelNotAvailableError,
    describe_model,
    ensure_pad_token,
    load_base_model,
    load_tiny,
)
from mtpeft.models.pretrain import CHECKPOINT_FILE, PretrainConfig, make_windows, pack_lines, pretrain
from mtpeft.models.tiny import ARCHITECTURES, TinyModelConfig, build_tiny_model, count_parameters
from mtpeft.models.tokenizer import fragmentation, train_tokenizer
from tests.conftest import make_tiny_base

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

ROUND_TRIP = [
    "context : bob owns a owl . grace works as a poet . question : what does bob own ? answer : owl",
    "def f ( x , y ) : # take y , add 3 , multiply by x ; return : return ( y + 3 ) * x",
    "18 + 5 = 23 . 23 - 3 = 20 . #### 20",
    "  leading, trailing and  double  spaces  ",
    "tabs\tand\nnew lines\r\n",
    "Ünïcödé: naïve café, Ελληνικά, русский, 日本語, 한국어, עברית",
    "emoji 🎉🤖👍🏽 and ZWJ 👩‍👩‍👧",
    "",
]


def _tiny_cfg(cache_dir: Path, arch: str = "llama", steps: int = 5) -> dict[str, Any]:
    """A tiny-model config node with a few-step pre-training budget."""
    return {
        "kind": "tiny",
        "arch": arch,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "vocab_size": 1024,
        "pretrain": {
            "steps": steps,
            "batch_size": 4,
            "seq_len": 32,
            "lr": 3e-3,
            "warmup": 1,
            "seed": 0,
            "corpus_lines": 200,
        },
        "cache_dir": str(cache_dir),
    }


def _entries(root: Path, prefix: str) -> list[Path]:
    """Cache entry directories of ``root`` whose name starts with ``prefix``."""
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


@pytest.fixture(scope="module")
def tokenizer():
    """The tokenizer trained on the real tokenizer corpus (fast: ~0.1 s)."""
    return train_tokenizer(tokenizer_corpus(0))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tiny llama built (5 pre-training steps) into a fresh cache dir."""
    root = tmp_path_factory.mktemp("cache")
    return root, load_tiny(_tiny_cfg(root))


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_any_utf8(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[:1] == [tokenizer.bos_token_id]
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.unk_token is None
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    tokenizer.padding_side = "left"
    batch = tokenizer(["a", "bob owns a owl ."], padding=True)
    tokenizer.padding_side = "right"
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0


def test_tokenizer_keeps_numbers_and_lexicon_whole(tokenizer):
    numbers = fragmentation(tokenizer, [str(n) for n in range(61)])
    assert set(numbers.values()) == {1}
    words = {w for text in tokenizer_corpus(0) for w in text.split()}
    frag = fragmentation(tokenizer, words)
    single = sum(n == 1 for n in frag.values()) / len(frag)
    assert single > 0.9, {w: n for w, n in frag.items() if n > 1}


def test_tokenizer_save_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ROUND_TRIP:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.pad_token_id == tokenizer.pad_token_id and loaded.eos_token_id == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------- tiny model


def test_weights_digest_names_the_base(tokenizer):
    """results.json's model.weights_sha256: equal for equal weights, different after any weight change."""
    first = build_tiny_model(TinyModelConfig(), tokenizer)
    second = build_tiny_model(TinyModelConfig(), tokenizer)
    second.load_state_dict(first.state_dict())
    digest = describe_model(first)["weights_sha256"]
    assert len(digest) == 16 and describe_model(second)["weights_sha256"] == digest
    with torch.no_grad():
        next(second.parameters()).view(-1)[0] += 1e-6
    assert describe_model(second)["weights_sha256"] != digest


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tiny_model_builds(tokenizer, arch):
    model = build_tiny_model(TinyModelConfig(arch=arch), tokenizer)
    assert 500_000 <= count_parameters(model) <= 2_000_000
    info = describe_model(model)
    assert info["arch"] == arch and info["num_kv_heads"] == 2 and info["vocab_size"] == len(tokenizer)
    ids = tokenizer(["bob owns a owl .", "18 + 5 = 23 ."], padding=True, return_tensors="pt")
    out = model(**ids, labels=ids["input_ids"])
    assert out.logits.shape[-1] == len(tokenizer) and torch.isfinite(out.loss)
    assert model.config.pad_token_id == tokenizer.pad_token_id != model.config.eos_token_id
    tokenizer.padding_side = "left"
    prompts = tokenizer(["bob owns a", "18 + 5 ="], padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    generated = model.generate(**prompts, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, prompts["input_ids"].shape[1] + 4)


def test_tiny_model_is_seeded(tokenizer):
    state = torch.get_rng_state()
    a = build_tiny_model(TinyModelConfig(seed=1), tokenizer)
    b = build_tiny_model(TinyModelConfig(seed=1), tokenizer)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_tiny_config_rejects_bad_arch():
    with pytest.raises(ValueError, match=r"(?s)arch.*'llama', 'qwen2' or 'mistral'.*gpt2"):
        TinyModelConfig(arch="gpt2")
    with pytest.raises(ValueError, match=r"model\.hidden_size=128 is not divisible by num_heads=3"):
        parse_model({"kind": "tiny", "num_heads": 3})


# --------------------------------------------------------------------------------------- pre-training


def test_pack_lines_and_pretrain_lowers_loss(tokenizer):
    lines = primitives_corpus(300, 0)
    stream, offsets = pack_lines(tokenizer, lines[:3])
    assert stream[offsets].tolist() == [tokenizer.bos_token_id] * 3
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64), tokenizer)
    cfg = PretrainConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup=3)
    result = pretrain(model, tokenizer, lines, cfg, progress=False)
    assert result.eval_loss_end < result.eval_loss_start - 0.5
    assert result.copy_loss_end < result.copy_loss_start
    assert not model.training


class _Interrupt(Exception):
    """Raised from ``on_step`` to simulate a killed pre-training."""


def _stop_at(step: int):
    def on_step(done: int) -> None:
        if done == step:
            raise _Interrupt(done)

    return on_step


def _small_model(tokenizer):
    return build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64), tokenizer)


@pytest.mark.parametrize("stop", [10, 12])  # on a checkpoint, and two steps past one (redone on resume)
def test_interrupted_pretraining_resumes_bit_identically(tokenizer, tmp_path, stop):
    lines = primitives_corpus(200, 0)
    cfg = PretrainConfig(steps=20, batch_size=4, seq_len=32, warmup=2)
    reference = _small_model(tokenizer)
    expected = pretrain(reference, tokenizer, lines, cfg, progress=False)

    with pytest.raises(_Interrupt):
        pretrain(_small_model(tokenizer), tokenizer, lines, cfg, False, tmp_path, 5, _stop_at(stop))
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 10 and len(saved["progress"]["losses"]) == 10

    seen: list[int] = []
    resumed = _small_model(tokenizer)  # a fresh process: new random init, state comes from the checkpoint
    result = pretrain(resumed, tokenizer, lines, cfg, False, tmp_path, 5, seen.append)
    assert seen == list(range(11, 21))  # continued, not restarted
    want = reference.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.state_dict().items())
    same = ("final_loss", "first_loss", "eval_loss_start", "eval_loss_end", "copy_loss_end", "tokens")
    assert {k: getattr(result, k) for k in same} == {k: getattr(expected, k) for k in same}


def test_checkpointing_does_not_change_pretraining(tokenizer, tmp_path):
    lines = primitives_corpus(200, 0)
    cfg = PretrainConfig(steps=7, batch_size=4, seq_len=32, warmup=2)
    plain, saving = _small_model(tokenizer), _small_model(tokenizer)
    pretrain(plain, tokenizer, lines, cfg, progress=False)
    pretrain(saving, tokenizer, lines, cfg, False, tmp_path, checkpoint_every=2)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in saving.state_dict().items())
    other = PretrainConfig(steps=7, batch_size=4, seq_len=32, warmup=3)  # a checkpoint of another config
    fresh, seen = _small_model(tokenizer), []
    pretrain(fresh, tokenizer, lines, other, False, tmp_path, 2, seen.append)
    assert seen[0] == 1


def test_repeat_windows_show_the_first_line_twice(tokenizer):
    windows = make_windows(primitives_corpus(50, 0), tokenizer, seq_len=48)
    line = windows.stream[int(windows.starts[0]) : int(windows.ends[0])].tolist()
    doubled = windows.window(0, repeat=True).tolist()
    assert doubled[0] == tokenizer.bos_token_id and line[-1] == tokenizer.eos_token_id
    assert doubled[: 2 * len(line)] == (line + line)[:48] and len(doubled) == 48
    assert windows.window(0).tolist()[: len(line)] == line


# -------------------------------------------------------------------------------------------- cache


def test_cache_hit_returns_identical_weights(cached):
    root, first = cached
    assert first.meta["pretrain"]["eval_loss_end"] < first.meta["pretrain"]["eval_loss_start"]
    t0 = time.perf_counter()
    model, tokenizer = load_base_model(_tiny_cfg(root))
    assert time.perf_counter() - t0 < 10
    assert len(_entries(root, "tiny-llama-")) == 1
    first_state = first.model.state_dict()
    assert all(torch.equal(v, first_state[k]) for k, v in model.state_dict().items())
    assert tokenizer.get_vocab() == first.tokenizer.get_vocab()


def test_cache_key_changes_with_config(cached):
    root, first = cached
    cfg = _tiny_cfg(root)
    cfg["pretrain"]["steps"] = 0
    other = load_tiny(cfg)
    assert other.entry != first.entry and "pretrain" not in other.meta


def test_cache_dir_from_env(tmp_path, monkeypatch):
    def build(directory: Path) -> dict[str, Any]:
        (directory / "x.txt").write_text("x")
        return {"n": 1}

    monkeypatch.setenv("MTPEFT_CACHE_DIR", str(tmp_path))
    entry, meta = get_or_build("thing", {"a": 1}, build)
    assert meta["n"] == 1 and (entry / "x.txt").read_text() == "x"
    assert entry.parent == tmp_path and entry.name == f"thing-{key_hash({'a': 1})}"


def test_corrupt_entry_is_rebuilt(tmp_path):
    first = load_tiny(_tiny_cfg(tmp_path, steps=0))
    (first.entry / "model.safetensors").write_bytes(b"garbage")
    assert read_manifest(first.entry) is None
    second = load_tiny(_tiny_cfg(tmp_path, steps=0))
    assert second.entry == first.entry and read_manifest(second.entry) is not None
    assert second.meta["build_id"] != first.meta["build_id"]
    (second.entry / MANIFEST).unlink()  # interrupted before the manifest: also rebuilt
    third = load_tiny(_tiny_cfg(tmp_path, steps=0))
    assert third.meta["build_id"] != second.meta["build_id"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_interrupted_build_resumes_from_the_cache(tmp_path, monkeypatch):
    """A build killed mid pre-training keeps its checkpoint in the cache; the next load continues from it."""
    real = loader_module.pretrain
    seen: list[int] = []

    def killed(*args, **kwargs):
        return real(*args, **kwargs, checkpoint_every=2, on_step=_stop_at(4))

    monkeypatch.setattr(loader_module, "pretrain", killed)
    with pytest.raises(_Interrupt):
        load_tiny(_tiny_cfg(tmp_path, steps=6))
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".partial-tiny-llama-")]
    assert len(partial) == 1 and (partial[0] / "resume" / CHECKPOINT_FILE).is_file()
    assert not (partial[0] / "build").exists() and not _entries(tmp_path, "tiny-llama-")

    monkeypatch.setattr(loader_module, "pretrain", lambda *a, **k: real(*a, **k, on_step=seen.append))
    resumed = load_tiny(_tiny_cfg(tmp_path, steps=6))
    assert seen == [5, 6]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
    assert set(json.loads((resumed.entry / MANIFEST).read_text())["files"]).isdisjoint({CHECKPOINT_FILE})

    monkeypatch.setattr(loader_module, "pretrain", real)
    whole = load_tiny(_tiny_cfg(tmp_path / "other", steps=6))
    want = whole.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.model.state_dict().items())


def test_default_model_cache_key_is_unchanged(monkeypatch, tmp_path):
    """Existing caches and published numbers depend on the default tiny model's key: it must not move."""

    class Stop(Exception):
        pass

    def capture(name, parts, build, cache_dir=None):
        if name.startswith("tiny-"):
            raise Stop(f"{name}-{key_hash(parts)}")
        return get_or_build(name, parts, build, cache_dir)

    monkeypatch.setattr(loader_module, "get_or_build", capture)
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "tiny_llama.yaml"), resolve=False)
    node["cache_dir"] = str(tmp_path)
    with pytest.raises(Stop, match=r"^tiny-llama-12a467a5e16d$"):
        load_tiny(node)


def _load_in_child(cache_dir: str, queue) -> None:
    """Child process of the concurrency test: load the tiny model and report the build it got."""
    art = load_tiny(_tiny_cfg(Path(cache_dir)))
    queue.put((art.meta["build_id"], str(art.entry)))


def test_concurrent_builds_end_with_one_entry(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]  # same entry, built once (same build id)
    assert len(_entries(tmp_path, "tiny-llama-")) == 1
    assert len(_entries(tmp_path, "tokenizer-")) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


# --------------------------------------------------------------------------------------------- loader


def test_unknown_kind_and_keys_are_named():
    with pytest.raises(ValueError, match=r"model\.kind='gguf' is not valid: use one of 'tiny', 'hub'"):
        load_base_model({"kind": "gguf"})
    with pytest.raises(
        ValueError, match=r"unknown key model\.hiden_size: .*\(did you mean 'hidden_size'\?\)"
    ):
        load_base_model({"kind": "tiny", "hiden_size": 64})
    with pytest.raises(ValueError, match=r"unknown key model\.pretrain\.step: .*valid keys: batch_size"):
        load_base_model({"kind": "tiny", "pretrain": {"step": 1}})
    with pytest.raises(ValueError, match=r"model\.pretrain\.steps=True is not valid: .*integer"):
        load_base_model({"kind": "tiny", "pretrain": {"steps": True}})
    with pytest.raises(ValueError, match=r"model\.dtype='fp8' is not valid: .*'float32', 'bfloat16'"):
        load_base_model({"kind": "hub", "name_or_path": "x", "dtype": "fp8"})
    with pytest.raises(ValueError, match=r"unknown key model\.arch: 'arch' is not an option of model"):
        load_base_model({"kind": "hub", "arch": "llama"})
    with pytest.raises(ValueError, match="model.name_or_path is not set"):
        load_base_model({"kind": "hub", "name_or_path": "???"})


def test_hub_missing_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="mtpeft-tests/no-such-model.*huggingface-cli download"):
        load_base_model({"kind": "hub", "name_or_path": "mtpeft-tests/no-such-model", "allow_download": True})
    assert time.perf_counter() - t0 < 10


def test_hub_loads_local_directory(tokenizer, tmp_path):
    model = build_tiny_model(TinyModelConfig(arch="qwen2", hidden_size=32, intermediate_size=64), tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_base_model({"kind": "hub", "name_or_path": str(tmp_path), "dtype": "float32"})
    ids = tokenizer("bob owns a owl .", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    assert describe_model(loaded)["arch"] == "qwen2"


def test_pad_token_falls_back_to_eos(tokenizer, tmp_path, caplog):
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.pad_token = None
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tokenizer)
    model.config.pad_token_id = None
    with caplog.at_level("WARNING"):
        ensure_pad_token(tok, model)
    assert tok.pad_token == tok.eos_token and model.config.pad_token_id == tok.eos_token_id
    assert "no pad token" in caplog.text


# -------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2", "tiny_mistral", "local_dir"])
def test_model_configs_have_valid_keys(name, monkeypatch):
    monkeypatch.delenv("MTPEFT_CACHE_DIR", raising=False)
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"), resolve=True)
    spec = parse_model(node)
    assert isinstance(spec, TinyModelSpec if node["kind"] == "tiny" else HubModelSpec)
    if isinstance(spec, TinyModelSpec):
        assert spec.cache_dir is None
        assert isinstance(spec.pretrain, PretrainConfig)
        assert (spec.pretrain.steps > 0) == (name == "tiny_llama")


def test_manifest_records_build(cached):
    root, first = cached
    manifest = json.loads((first.entry / MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["meta"]["params"] == count_parameters(first.model)


@pytest.mark.parametrize(
    ("method", "options"),
    [(name, {}) for name in available_methods()] + [("hycam", {"train_layernorms": True})],
)
def test_weights_digest_of_an_adapted_model_names_its_base(method: str, options: dict) -> None:
    """A run records the digest of its base after training: `AdaptedModel.base_state_dict` leaves the
    trained adapter out (wrapped, attached and trained base parameters alike), so every run on one base
    records the same digest."""
    base = make_tiny_base()
    loaded = describe_model(base)["weights_sha256"]
    model = build_method(method, options, base, num_tasks=3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)  # as if trained
    assert describe_model(base, model.base_state_dict())["weights_sha256"] == loaded
    if model.count_parameters()[0]:
        assert describe_model(base)["weights_sha256"] != loaded  # the adapted model's own state differs
