"""Helpers for the data-source tests: the tiny model's tokenizer and local stand-ins in hub layouts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerFast

from mtpeft.data.synthetic.primitives import tokenizer_corpus
from mtpeft.models.tokenizer import train_tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer of the tiny default model (trained on the tokenizer corpus)."""
    return train_tokenizer(tokenizer_corpus(0))


def write_json(path: Path, records: Sequence[Any]) -> Path:
    """An Alpaca-style JSON list, pretty-printed (one field per line) like the Alpaca-CoT files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: Sequence[Any]) -> Path:
    """One JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_hub_repo(root: Path, configs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> Path:
    """A local copy of a hub dataset repository: ``<config>/<split>-00000-of-00001.parquet`` + README configs.

    This is the layout ``hf download --repo-type dataset <id> --local-dir <root>`` produces for
    openai/gsm8k, google-research-datasets/mbpp and rajpurkar/squad.
    """
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (root / config).mkdir(parents=True, exist_ok=True)
            pq.write_table(
                pa.Table.from_pylist(list(rows)), root / config / f"{split}-00000-of-00001.parquet"
            )
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]), encoding="utf-8")
    return root


def alpaca_rows(n: int, prefix: str = "item") -> list[dict[str, str]]:
    """``n`` distinct Alpaca records."""
    return [
        {"instruction": f"{prefix} question {i}", "input": "", "output": f"{prefix} answer {i}"}
        for i in range(n)
    ]
