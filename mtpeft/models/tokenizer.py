"""Byte-level BPE tokenizer for the tiny local model.

Why byte-level: every UTF-8 string maps to tokens (the 256 byte symbols are always in the vocabulary), so
there is no ``<unk>`` and real datasets (non-ASCII, emoji, code with tabs) run on the tiny model. The GPT-2
style ``ByteLevel`` pre-tokenizer keeps spaces inside the tokens (``"Ġowl"`` = ``" owl"``), so
``decode(encode(s), skip_special_tokens=True) == s`` holds exactly, leading and repeated spaces included.

Conventions (Llama-like, so the tiny model and hub Llama models behave alike):

* ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``; pad != eos, so padding never looks like end of text;
* ``tokenizer(text)`` prepends ``<s>`` (``add_special_tokens=False`` gives the raw ids); ``</s>`` is never
  added automatically: the caller appends it to training targets so generation learns to stop;
* a word after a space is a different token from the same word at the start of a text (``"Ġowl"`` vs
  ``"owl"``): tokenize the prompt and the target *together* (``prompt + " " + target``), or tokenize the
  target with its leading space.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)

#: Numbers the tasks use (counts, operands, results: 0..60 per docs/data.md 4.3, up to 99 for headroom); boosted
#: so that each becomes one token (ours).
DEFAULT_WHOLE_WORDS: tuple[str, ...] = tuple(str(n) for n in range(100))

#: How many extra lines of the whole words are added to the training texts (enough to win the merges).
_WHOLE_WORD_REPEATS = 64


def _training_texts(texts: Iterable[str], whole_words: Sequence[str]) -> Iterator[str]:
    """Yield the corpus, then ``whole_words`` as space-separated lines (with and without a leading word).

    BPE merges by frequency; repeating the words makes their merges win, so numbers 0..60 end as single
    tokens both after a space (``"Ġ42"``) and at the start of a text (``"42"``).
    """
    yield from texts
    if whole_words:
        line = " ".join(whole_words)
        for _ in range(_WHOLE_WORD_REPEATS):
            yield line
            yield from whole_words


def _build_backend(texts: Iterable[str], vocab_size: int, whole_words: Sequence[str]) -> Tokenizer:
    """Train the raw ``tokenizers`` byte-level BPE model with the special tokens at ids 0, 1, 2."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_texts(texts, whole_words), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return backend


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    whole_words: Sequence[str] = DEFAULT_WHOLE_WORDS,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Args:
        texts: training texts (e.g. ``tokenizer_corpus()``, which covers every word of the offline tasks).
        vocab_size: target vocabulary size including the 256 byte symbols and the 3 special tokens; the
            result may be smaller when the corpus has fewer mergeable pairs.
        whole_words: words to boost so that BPE keeps them whole (numbers 0..60 by default).
        padding_side: ``"right"`` for training, ``"left"`` for batched generation; settable later too.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token``/``bos_token``/``eos_token`` set and
        ``clean_up_tokenization_spaces=False`` (the default clean-up would turn ``"a ."`` into ``"a."``).
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum}.")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} is invalid: use 'left' or 'right'.")
    backend = _build_backend(texts, vocab_size, whole_words)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def fragmentation(tokenizer: PreTrainedTokenizerFast, words: Iterable[str]) -> dict[str, int]:
    """Return ``{word: n_tokens}`` for each word as it appears after a space (the common position).

    Used to check (and report) that numbers and the task lexicon stay single or few tokens.
    """
    return {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in dict.fromkeys(words)}
