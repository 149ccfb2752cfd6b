"""The tiny preset's tokenizer, built offline in code, and how a planner folder stores a tokenizer.

A byte-level BPE with no merges: ids 0..255 are the 256 bytes (GPT-2's byte-to-unicode alphabet, the one
Qwen's tokenizer uses), then Qwen's special tokens at the ids ``presets.TINY_SPECIAL_TOKENS`` fixes (256 + i).
Any text round-trips; a real checkpoint's Qwen BPE ``tokenizer.json`` goes through the same
``runtime.text.PromptTokenizer`` code.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.models.presets import TINY_SPECIAL_TOKENS, TINY_VOCAB
from metacanvas_deploy.runtime.text import CHAT_TEMPLATE, IM_END, PAD_TOKEN, PromptTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_tiny_tokenizer() -> Tokenizer:
    """The tiny preset's tokenizer: 256 byte tokens, then Qwen's special tokens at ids 256 + i."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}  # byte b -> id b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    for i, t in enumerate(TINY_SPECIAL_TOKENS):
        if tok.token_to_id(t) != 256 + i:  # presets.py fixes these ids in the model config
            raise ConfigError(f"tiny tokenizer put {t!r} at id {tok.token_to_id(t)}, expected {256 + i}")
    if tok.get_vocab_size() > TINY_VOCAB:
        raise ConfigError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, more than TINY_VOCAB={TINY_VOCAB}")
    return tok


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int = 32768) -> dict:
    """``tokenizer_config.json`` for a planner folder: Qwen2.5-VL's special tokens and chat template.

    ``PreTrainedTokenizerFast`` (transformers' wrapper of a ``tokenizer.json`` as it is) so that
    ``AutoTokenizer.from_pretrained`` loads the tiny tokenizer offline without rebuilding its pipeline.
    """
    added = {str(tokenizer.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                 single_word=False, special=True)
             for t in TINY_SPECIAL_TOKENS}
    return dict(
        tokenizer_class="PreTrainedTokenizerFast", added_tokens_decoder=added, bos_token=None, eos_token=IM_END,
        pad_token=PAD_TOKEN, unk_token=None, chat_template=CHAT_TEMPLATE, model_max_length=model_max_length,
        clean_up_tokenization_spaces=False, split_special_tokens=False, errors="replace",
    )


def save_tokenizer(directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (tiny tokenizer by default) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_tiny_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=2))
    return directory


def load_tokenizer(directory: str | Path, max_tokens: int) -> PromptTokenizer:
    """The planner's prompt tokenizer from a planner folder's ``tokenizer.json`` (tiny or Qwen's own)."""
    return PromptTokenizer.from_file(Path(directory) / "tokenizer.json", max_tokens)
