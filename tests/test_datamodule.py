"""MultiTaskDataModule: tokenisation, label masking, task ids, eval prompts and index alignment."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mtpeft.data import encode
from mtpeft.data.datamodule import MultiTaskDataModule
from mtpeft.data.encode import IGNORE_INDEX, encode_records, max_token_chars
from mtpeft.data.synthetic.primitives import tokenizer_corpus
from mtpeft.data.templates import get_template
from mtpeft.models.shipped import SHIPPED_DIR
from tests.conftest import bare_trainer

REPO = Path(__file__).resolve().parent.parent
TASKS = {
    "reasoning": {"train": 30, "val": 7, "test": 9, "conflict": 0.5},
    "qa": {"train": 20, "val": 5, "test": 6, "n_facts": 3},
    "code": {"train": 10, "val": 6, "test": 4},
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on ``tokenizer_corpus``; pad (0) != bos (1) != eos (2)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tokenizer_corpus(0), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


def _dm(tokenizer: PreTrainedTokenizerFast, **kwargs) -> MultiTaskDataModule:
    dm = MultiTaskDataModule(TASKS, tokenizer, **{"batch_size": 8, "eval_batch_size": 5, **kwargs})
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dm(tokenizer: PreTrainedTokenizerFast) -> MultiTaskDataModule:
    return _dm(tokenizer)


def test_task_ids_metrics_and_records(dm: MultiTaskDataModule) -> None:
    assert dm.task_names == ["code", "qa", "reasoning"]
    assert [dm.task_id(t) for t in dm.task_names] == [0, 1, 2]
    with pytest.raises(ValueError, match="tasks: code, qa, reasoning"):
        dm.task_id("math")
    assert dm.metrics_for("code") == ("pass@1",) and dm.max_new_tokens_for("qa") > 0
    test = dm.records("test")
    assert [r["task"] for r in test] == ["code"] * 4 + ["qa"] * 6 + ["reasoning"] * 9
    with pytest.raises(ValueError, match="valid splits"):
        dm.records("dev")


def test_train_batches_follow_the_sampler(
    dm: MultiTaskDataModule, tokenizer: PreTrainedTokenizerFast
) -> None:
    examples = dm.examples("train")
    order = list(dm.sampler)
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
        assert batch["task_ids"].dtype == torch.long
        for row in range(batch["input_ids"].shape[0]):
            example = examples[order[len(seen)]]
            length = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :length].tolist() == example.input_ids  # right padding
            assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
            assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
            assert int(batch["task_ids"][row]) == example.task_id
            seen.append(example.task_id)
    assert len(seen) == 60
    assert {dm.task_names[t]: seen.count(t) for t in range(3)} == dm.sampler.realised_counts()


def test_answer_only_labels(dm: MultiTaskDataModule, tokenizer: PreTrainedTokenizerFast) -> None:
    plain = get_template("plain")
    for example, record in zip(dm.examples("train"), dm.records("train"), strict=True):
        prompt, target = plain(record)
        n_prompt = len(example.prompt_ids)
        assert example.input_ids[:n_prompt] == example.prompt_ids
        assert example.prompt_ids[0] == tokenizer.bos_token_id
        assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        assert example.input_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(example.labels[n_prompt:], skip_special_tokens=True) == target
        assert tokenizer.decode(example.input_ids, skip_special_tokens=True) == prompt + target


def test_loss_on_prompt_labels(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = _dm(tokenizer, loss_on_prompt=True)
    batch = next(iter(dm.train_dataloader()))
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["labels"][~mask] == IGNORE_INDEX).all()


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_batches_carry_left_padded_prompts_and_index(
    dm: MultiTaskDataModule, tokenizer: PreTrainedTokenizerFast, split: str
) -> None:
    records = dm.records(split)
    indices = []
    for batch in getattr(dm, f"{split}_dataloader")():
        prompts = batch["prompt_ids"]
        mask = batch["prompt_attention_mask"]
        assert (mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
        assert (prompts[mask == 0] == tokenizer.pad_token_id).all()
        decoded = tokenizer.batch_decode(prompts, skip_special_tokens=True)
        for row, index in enumerate(batch["index"].tolist()):
            record = records[index]
            assert decoded[row] == record["instruction"]
            assert dm.task_names[int(batch["task_ids"][row])] == record["task"]
        indices += batch["index"].tolist()
    assert sorted(indices) == list(range(len(records)))  # each once (ordered by task, prompt length)


def test_deterministic_given_seed(tokenizer: PreTrainedTokenizerFast, dm: MultiTaskDataModule) -> None:
    again = _dm(tokenizer)
    assert again.records("val") == dm.records("val")
    assert list(again.sampler) == list(dm.sampler)
    other = _dm(tokenizer, seed=1)
    assert other.records("val") != dm.records("val")


def test_train_dataloader_follows_the_trainer_epoch(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = _dm(tokenizer)
    first = list(dm.sampler)
    dm.trainer = SimpleNamespace(current_epoch=3)
    dm.train_dataloader()
    assert dm.sampler.epoch == 3 and list(dm.sampler) != first


@pytest.mark.parametrize("grouped", [True, False])
def test_state_dict_restores_the_sampler(tokenizer: PreTrainedTokenizerFast, grouped: bool) -> None:
    settings = {"temperature": 2.0, "samples_per_epoch": 40, "group_by_length": grouped, "batch_size": 8}
    dm = _dm(tokenizer, **settings)
    dm.sampler.set_epoch(2)
    iterator = iter(dm.sampler)
    head = [next(iterator) for _ in range(10)]
    state = dm.state_dict()
    resumed = MultiTaskDataModule(TASKS, tokenizer, **settings)
    resumed.load_state_dict(state)  # Lightning restores before or after setup: both work
    resumed.setup("fit")
    dm.sampler.set_epoch(2)
    assert head + list(resumed.sampler) == list(dm.sampler)


def test_length_grouping_keeps_the_draws_and_cuts_padding(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    """Same examples per epoch (exact per-task counts) with and without grouping; less padding, logged."""
    logged: list[dict] = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
    runs = {}
    for grouped in (False, True):
        dm = _dm(tokenizer, group_by_length=grouped, samples_per_epoch=240)
        dm.trainer = SimpleNamespace(current_epoch=1, loggers=[logger])
        with caplog.at_level(logging.INFO, logger="mtpeft.data.datamodule"):
            batches = list(dm.train_dataloader())
        rows = [
            (t, tuple(r[m.bool()].tolist()))
            for b in batches
            for t, r, m in zip(b["task_ids"].tolist(), b["input_ids"], b["attention_mask"], strict=True)
        ]
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        assert dm.padding_fraction == pytest.approx(1 - real / padded)  # what the batches really hold
        runs[grouped] = (sorted(rows), dm.sampler.realised_counts(), dm.padding_fraction)
    assert runs[True][0] == runs[False][0] and runs[True][1] == runs[False][1]
    assert runs[True][2] < runs[False][2] / 2
    assert [m["data/padding_fraction"] for m in logged] == [runs[False][2], runs[True][2]]
    assert caplog.text.count("training padding:") == 2 and "over 30 batches" in caplog.text


def test_overlength_truncate_and_skip(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mtpeft.data.datamodule"):
        dm = _dm(tokenizer, max_length=34)
    assert "truncated" in caplog.text and "max_length=34" in caplog.text
    assert all(len(e.input_ids) <= 34 for e in dm.examples("train"))
    skipping = _dm(tokenizer, max_length=34, overlength="skip")
    for split in ("train", "test"):
        records, examples = skipping.records(split), skipping.examples(split)
        assert len(records) == len(examples) < len(dm.records(split))
        assert [e.index for e in examples] == list(range(len(records)))
        assert all(len(e.input_ids) <= 34 for e in examples)


def _record(instruction: str, output: str) -> dict:
    return {"task": "qa", "instruction": instruction, "input": "", "output": output, "answer": "", "meta": {}}


def _words(n: int, seed: int) -> str:
    """``n`` varied words from the tokenizer corpus (so BPE merges across the cut are exercised)."""
    words = " ".join(tokenizer_corpus(0)).split()
    return " ".join(words[(seed * 7919 + 13 * i) % len(words)] for i in range(n))


@pytest.mark.parametrize("loss_on_prompt", [False, True])
def test_character_budget_gives_the_same_examples(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch, loss_on_prompt: bool
) -> None:
    """Normal records and records far over max_length encode exactly as when tokenised whole."""
    records = [_record(_words(n, n), _words(m, m + 1)) for n, m in [(3, 2), (10, 30), (400, 5), (5, 900)]]
    records.append(_record("x" * 5000, "y" * 300))  # one long "word" on each side of the cut

    def encode_all(chosen: list[dict]):
        return encode_records(chosen, [0] * len(chosen), tokenizer, get_template("plain"), 40, loss_on_prompt)

    budget = (40 + encode.CUT_MARGIN) * max_token_chars(tokenizer)
    assert max(len(r["instruction"]) for r in records) > budget  # the cut really happens
    bounded, normal = encode_all(records), encode_all(records[:2])
    monkeypatch.setattr(encode, "max_token_chars", lambda tok: 10**9)  # no cut: whole-text reference
    reference = encode_all(records)
    assert bounded[:2] == reference[:2]  # examples and kept records
    assert (bounded[2].truncated, bounded[2].skipped) == (reference[2].truncated, reference[2].skipped)
    assert bounded[2].truncated >= 3
    assert 40 < bounded[2].longest <= reference[2].longest  # longest counts the cut part of a cut text
    assert normal == encode_all(records[:2])  # within the budget: identical, stats included


def test_huge_record_is_cut_before_tokenising(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 50 MB record gives max_length tokens, and the tokenizer never sees more than the budget."""
    huge = _record("bob owns a owl . " * 3_000_000, "answer " * 1000)
    assert len(huge["instruction"]) >= 50_000_000
    seen: list[int] = []
    real_call = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    (example,), _, stats = encode_records([huge], [0], tokenizer, get_template("plain"), 64)
    assert len(example.input_ids) == len(example.labels) == len(example.prompt_ids) == 64
    assert stats.truncated == 1 and stats.longest > 64
    assert max(seen) <= (64 + encode.CUT_MARGIN) * max_token_chars(tokenizer)
    small = _record("a", "b")
    kept, records, stats = encode_records(
        [huge, small], [0, 0], tokenizer, get_template("plain"), 64, False, "skip"
    )
    assert len(kept) == 1 and records == [small] and stats.skipped == 1


def test_alpaca_template(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = _dm(tokenizer, template="alpaca", max_length=256)
    record, example = dm.records("val")[0], dm.examples("val")[0]
    decoded = tokenizer.decode(example.prompt_ids, skip_special_tokens=True)
    assert decoded.endswith(f"### Instruction:\n{record['instruction']}\n\n### Response:")
    target = tokenizer.decode(example.input_ids[len(example.prompt_ids) :], skip_special_tokens=True)
    assert target == record["output"]


def test_config_errors(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"data\.tasks\.squad: unknown task .squad.; \w+ tasks: code"):
        MultiTaskDataModule({"squad": {"train": 1}}, tokenizer)
    with pytest.raises(
        ValueError, match=r"unknown key data\.tasks\.qa\.n_fact: .*\(did you mean 'n_facts'\?\)"
    ):
        MultiTaskDataModule({"qa": {"train": 1, "n_fact": 2}}, tokenizer)
    with pytest.raises(
        ValueError, match=r"data\.tasks\.qa\.val=-1 is not valid: .*greater than or equal to 0"
    ):
        MultiTaskDataModule({"qa": {"train": 1, "val": -1}}, tokenizer)
    with pytest.raises(
        ValueError, match=r"data\.overlength='drop' is not valid: Input should be 'truncate' or 'skip'"
    ):
        MultiTaskDataModule(TASKS, tokenizer, overlength="drop")
    with pytest.raises(RuntimeError, match="call setup"):
        MultiTaskDataModule(TASKS, tokenizer).records("val")
    with pytest.raises(
        ValueError, match=r"data\.group_pool_batches=0 is not valid: .*greater than or equal to 1"
    ):
        MultiTaskDataModule(TASKS, tokenizer, group_pool_batches=0)
    with pytest.raises(ValueError, match=r"data\.group_by_length='yes' is not valid: .*boolean"):
        MultiTaskDataModule(TASKS, tokenizer, group_by_length="yes")
    with pytest.raises(ValueError, match=r"data\.batch_size=True is not valid: .*true/false is not a number"):
        MultiTaskDataModule(TASKS, tokenizer, batch_size=True)
    with pytest.raises(ValueError, match="no task has training records"):
        only_eval = MultiTaskDataModule({"qa": {"val": 2}}, tokenizer)
        only_eval.setup()
        only_eval.train_dataloader()


def test_accepts_omegaconf_task_tables(tokenizer: PreTrainedTokenizerFast) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    table = omegaconf.OmegaConf.create({"code": {"train": 4, "val": 2, "ops": ["add", "mul"]}})
    dm = MultiTaskDataModule(table, tokenizer)
    dm.setup()
    assert len(dm.records("train")) == 4 and len(dm.records("val")) == 2


def test_lightning_reseeds_each_epoch_and_checkpoints_the_sampler(
    tokenizer: PreTrainedTokenizerFast, tmp_path
) -> None:
    import lightning

    class Probe(lightning.LightningModule):
        """Records which sampler epoch each training batch came from."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.epochs: list[tuple[int, int]] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.epochs.append((self.current_epoch, self.trainer.datamodule.sampler.epoch))
            return (self.weight**2).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MultiTaskDataModule(TASKS, tokenizer, batch_size=16)
    probe = Probe()
    trainer = bare_trainer(tmp_path, max_epochs=2)
    trainer.fit(probe, datamodule=dm)
    assert sorted(set(probe.epochs)) == [(0, 0), (1, 1)]
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["MultiTaskDataModule"]["sampler"]
    assert saved["epoch"] == 1 and saved["position"] == 60


CHAT = (
    "{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)


def test_chat_template_wraps_prompts_once_with_a_single_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map
    )
    tok.chat_template = CHAT
    chat = _dm(tok, chat_template=True)
    plain = _dm(tokenizer)
    assert chat.template_name == "plain+chat" and plain.template_name == "plain"
    example, record = chat.examples("val")[0], chat.records("val")[0]
    prompt = tok.decode(example.prompt_ids)
    assert prompt == f"<s><|user|> {record['instruction']} <|assistant|>"
    assert example.prompt_ids[:2] != [tok.bos_token_id] * 2
    target = [t for t in example.labels if t != IGNORE_INDEX]
    assert target == plain.examples("val")[0].labels[-len(target) :]  # same target, new prompt


def test_chat_template_needs_one_in_the_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="has no chat template; set model.chat_template=false"):
        MultiTaskDataModule(TASKS, tokenizer, chat_template=True)


def test_eval_loaders_give_each_example_to_one_rank_under_ddp(
    dm: MultiTaskDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's default DistributedSampler pads with repeats; summed metric states would count them twice."""
    n = len(dm.examples("val"))
    one_process = [i for b in dm.val_dataloader() for i in b["index"].tolist()]
    assert sorted(one_process) == list(range(n))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    seen = []
    for rank in range(4):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        seen += [i for b in dm.val_dataloader() for i in b["index"].tolist()]
    assert sorted(seen) == list(range(n)) and n % 4 != 0  # no example twice although n is not divisible


def test_length_groups_span_all_ranks_under_ddp(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning deals the stream to ranks in turn: each rank's batch must still hold similar lengths."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    dm = _dm(tokenizer, samples_per_epoch=64, group_by_length=True)
    assert dm.sampler.state_dict()["length_grouping"]["batch_size"] == 16
    lengths = [len(dm.examples("train")[i].input_ids) for i in dm.sampler.epoch_indices()]
    for rank in range(2):
        mine = lengths[rank::2]  # DistributedSampler(shuffle=False) over the sampler's stream
        for start in range(0, len(mine), 8):
            assert mine[start : start + 8] == sorted(mine[start : start + 8])


#: mix3_hard's reasoning knobs: 5-step chains with numbers up to ~1000, whose targets outgrow the registered
#: budget of 40 tokens under a tokenizer that spells numbers out in small pieces.
LONG_REASONING = {"train": 4, "val": 20, "test": 20, "steps": 5, "max_start": 50, "max_arg": 20}


def _dm_of(tokenizer: PreTrainedTokenizerFast, tasks: dict) -> MultiTaskDataModule:
    dm = MultiTaskDataModule(tasks, tokenizer, batch_size=8, eval_batch_size=5)
    dm.setup("fit")
    return dm


def _longest_eval_target(dm: MultiTaskDataModule, task: str) -> int:
    targets = [dm.template(r)[1] for split in ("val", "test") for r in dm.records(split) if r["task"] == task]
    return max(len(dm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets) + 1


def test_budget_is_raised_to_fit_every_eval_target(tokenizer: PreTrainedTokenizerFast) -> None:
    """Without data.tasks.<t>.max_new_tokens a task's registered budget is a floor, raised so that the
    model can write out its longest val/test target and EOS."""
    dm = _dm_of(tokenizer, {"reasoning": LONG_REASONING, "qa": TASKS["qa"]})
    longest = _longest_eval_target(dm, "reasoning")
    assert longest > 40, "the test needs targets longer than reasoning's registered budget"
    assert dm.max_new_tokens_for("reasoning") == longest
    assert dm.max_new_tokens_for("qa") == 8  # registered budget, its targets fit


def test_mix3_budgets_are_the_registered_ones() -> None:
    """mix3's targets fit the registered budgets under the shipped tiny model's tokenizer, so its studies'
    runs generate exactly as before budgets were raised (their job hashes did not change)."""
    (shipped,) = SHIPPED_DIR.glob("tiny-llama-*")
    tiny = AutoTokenizer.from_pretrained(shipped)
    tasks = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / "mix3.yaml").tasks)
    for seed in (0, 1):
        dm = MultiTaskDataModule(tasks, tiny, seed=seed, max_length=128)
        dm.setup("fit")
        assert {t: dm.max_new_tokens_for(t) for t in dm.task_names} == {"code": 32, "qa": 8, "reasoning": 40}


def test_a_given_budget_is_kept_and_warns_when_targets_do_not_fit(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mtpeft.data.budgets"):
        dm = _dm_of(tokenizer, {"reasoning": {**LONG_REASONING, "max_new_tokens": 12}})
    assert dm.max_new_tokens_for("reasoning") == 12
    longest = _longest_eval_target(dm, "reasoning")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "task 'reasoning': " in warning and "need more than max_new_tokens=12 tokens" in warning
    assert f"set data.tasks.reasoning.max_new_tokens to {longest} or more" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtpeft.data.budgets"):
        roomy = _dm_of(tokenizer, {"reasoning": {**LONG_REASONING, "max_new_tokens": longest}})
    assert roomy.max_new_tokens_for("reasoning") == longest and not caplog.records


def test_budget_is_checked_with_the_config(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(
        ValueError, match=r"data\.tasks\.qa\.max_new_tokens=0 is not valid: .*greater than or equal to 1"
    ):
        MultiTaskDataModule({"qa": {"train": 1, "max_new_tokens": 0}}, tokenizer)
    with pytest.raises(RuntimeError, match="call setup"):
        MultiTaskDataModule(TASKS, tokenizer).max_new_tokens_for("qa")


def test_an_overlong_prompt_keeps_its_end_for_generation(tokenizer: PreTrainedTokenizerFast) -> None:
    """Generation needs the end of a prompt (the question, the response header): a prompt longer than
    max_length keeps its BOS and its last tokens, the same whether its text is short or huge."""
    template = get_template("plain")
    for words in (60, 200_000):  # the second is far over the character budget of bounded_token_ids
        record = _record(_words(words, seed=1) + " question : who owns the cat ? answer :", "dave")
        (example,), _, stats = encode_records([record], [0], tokenizer, template, max_length=24)
        whole = tokenizer(template(record)[0])["input_ids"]
        assert len(whole) > 24 and stats.prompts_cut == 1
        assert example.prompt_ids == [tokenizer.bos_token_id, *whole[-23:]]
        assert tokenizer.decode(example.prompt_ids).endswith("who owns the cat ? answer :")


def test_cut_eval_prompts_are_reported(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mtpeft.data.datamodule"):
        _dm(tokenizer, max_length=20)
    assert (
        "prompts are longer than max_length=20 tokens: generation sees their BOS and last tokens, 20 in all"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("knob", "message"),
    [
        ({"qa": {"train": 1, "hop2": "abc"}}, r"data\.tasks\.qa\.hop2='abc' is not valid: .*valid number"),
        (
            {"reasoning": {"train": 1, "max_start": 2.5}},
            r"data\.tasks\.reasoning\.max_start=2\.5 is not valid",
        ),
        ({"code": {"train": 1, "ops": "add"}}, r"data\.tasks\.code\.ops='add' is not valid: .*valid tuple"),
        ({"qa": {"train": 1, "n_facts": 40}}, r"data\.tasks\.qa: QAConfig\.n_facts=40 must be in 1\.\.12"),
    ],
)
def test_knob_values_are_checked_with_the_config(
    tokenizer: PreTrainedTokenizerFast, knob: dict, message: str
) -> None:
    """A generator knob's type and range are checked when the config is parsed (before any model loads),
    with an error naming ``data.tasks.<task>.<knob>``."""
    with pytest.raises(ValueError, match=message):
        MultiTaskDataModule(knob, tokenizer)


def test_task_caps_and_weights_reach_the_sampler(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = _dm(tokenizer, task_caps={"reasoning": 10}, task_weights={"code": 3.0})
    sizes = {"reasoning": min(30, 10), "qa": 20, "code": 3.0 * 10}
    assert dm.sampler.probabilities() == pytest.approx({k: v / sum(sizes.values()) for k, v in sizes.items()})
    with pytest.raises(
        ValueError, match=r"data\.task_weights: 'cooking' is not a task of this mixture; tasks: code"
    ):
        MultiTaskDataModule(TASKS, tokenizer, task_weights={"cooking": 2.0})
    with pytest.raises(ValueError, match=r"data\.task_caps\.qa=0 is not valid"):
        MultiTaskDataModule(TASKS, tokenizer, task_caps={"qa": 0})
    eval_only = _dm_of(tokenizer, {**TASKS, "qa": {"val": 5, "test": 5}})
    eval_only.mixing["task_weights"] = {"qa": 2.0}
    with pytest.raises(ValueError, match="'qa' has no training records"):
        eval_only.train_dataloader()
