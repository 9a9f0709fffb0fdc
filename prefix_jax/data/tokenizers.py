"""Loading a tokenizer (a model directory, Hub id or GGUF file), checked to round-trip text."""

from __future__ import annotations

import difflib
from typing import Any

from prefix_jax import hub
from prefix_jax.data.records import DataError
from prefix_jax.models import gguf_checkpoint


# Files from which `transformers` can build a tokenizer; without any of them it silently builds an empty
# one (T5: every word `<unk>`; GPT-2: every text empty).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model", "spm.model")
TOKENIZER_FIELD = "model.tokenizer, or model.name_or_path when model.tokenizer is empty"
_PROBE = "The quick brown fox jumps over the lazy dog 42."


def load_tokenizer(path_or_name: str, field: str = TOKENIZER_FIELD) -> Any:
    """`transformers.AutoTokenizer` for a model directory or Hub id (or the tokenizer a GGUF file describes),
    checked to tokenize text sensibly."""
    from transformers import AutoTokenizer

    fix = ("save the model's tokenizer there (`AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(DIR)`) or "
           "set model.tokenizer to a directory or Hub id that has one.")
    try:
        gguf_file = gguf_checkpoint.resolve(str(path_or_name), field)
        if gguf_file is not None:  # the tokenizer the GGUF file describes
            tokenizer = gguf_checkpoint.load_tokenizer(gguf_file)
            check_tokenizer(tokenizer, f"the tokenizer in {gguf_file} [{field}]", fix)
            return tokenizer
        directory = hub.resolve_tokenizer_dir(str(path_or_name), field)
    except hub.ModelNotFoundError as e:
        raise DataError(str(e)) from None
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...) [{field}]; "
                        f"{fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise DataError(f"{directory}: no tokenizer could be loaded ({hub.describe(e)}) [{field}]; {fix}") from e
    check_tokenizer(tokenizer, f"the tokenizer in {directory} [{field}]", fix)
    return tokenizer


def check_tokenizer(tokenizer: Any, what: str, fix: str) -> None:
    """Refuses a tokenizer that cannot round-trip a plain English sentence (an empty or all-`<unk>` one)."""
    size = len(tokenizer)
    if size < 16:
        raise DataError(f"{what} has only {size} tokens; its vocabulary files are missing or broken: {fix}")
    ids = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"{what} turns {_PROBE!r} into no tokens at all; its vocabulary files are missing or broken: "
                        f"{fix}")
    unk = tokenizer.unk_token_id
    if unk is not None and all(i == unk for i in ids):
        raise DataError(f"{what} turns {_PROBE!r} into unknown tokens only; its vocabulary files are missing or "
                        f"broken: {fix}")
    letters = lambda text: "".join(ch for ch in text.lower() if ch.isalnum())
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if difflib.SequenceMatcher(None, letters(_PROBE), letters(decoded)).ratio() < 0.5:
        raise DataError(f"{what} decodes {_PROBE!r} back as {decoded[:60]!r}; its vocabulary files are missing or "
                        f"broken: {fix}")
