"""The tiny preset's tokenizer, built offline in code, and how a planner folder stores a tokenizer.

A byte-level BPE with no merges: ids 0..255 are the 256 bytes (GPT-2's byte-to-unicode alphabet, the one
Qwen's tokenizer uses), then Qwen's special tokens at the ids ``presets.TINY_SPECIAL_TOKENS`` fixes (256 + i).
Any text round-trips; a real checkpoint's Qwen BPE ``tokenizer.json`` goes through the same
``runtime.text.PromptTokenizer`` code.

A full-size checkpoint written without Qwen's files (`init-checkpoint --preset full`) gets the same byte-level
tokenizer laid out as Qwen's: the 256 bytes, unused filler tokens up to Qwen's 151643 regular tokens, then
Qwen2.5's 22 added tokens at their real ids (``<|endoftext|>`` = 151643 ... ``<|file_sep|>`` = 151664), so
that the model config's token ids and vocabulary size hold. Text encodes byte by byte (no merges).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from metacanvas_deploy.mc_export.errors import ConfigError
from metacanvas_deploy.mc_export.models.presets import QWEN_TOKEN_IDS, TINY_SPECIAL_TOKENS, TINY_VOCAB
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


# Qwen2.5's added tokens in id order from QWEN_FIRST_ADDED, with their `special` flag (tokenizer_config.json of
# the Qwen2.5(-VL) checkpoints: the tool-call and fill-in-the-middle tokens are not special).
QWEN_FIRST_ADDED = 151643
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
# QWEN_TOKEN_IDS (the model config's ids) field -> the token at that id
_QWEN_CONFIG_TOKENS = dict(bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>",
                           image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                           vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")


def _byte_level(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_qwen_layout_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level tokenizer with Qwen2.5's ids: bytes 0..255, fillers, Qwen's added tokens from 151643.

    ``vocab_size`` is the model config's (152064 for the 7B, 151936 for the 3B: padded past the tokenizer's
    151665, as Qwen's are); every id the tokenizer can produce is below it."""
    n_added = len(QWEN_ADDED_TOKENS)
    if vocab_size < QWEN_FIRST_ADDED + n_added:
        raise ConfigError(f"a Qwen-layout tokenizer needs a vocabulary of at least {QWEN_FIRST_ADDED + n_added}, "
                          f"the config has {vocab_size}")
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}  # byte b -> id b
    # Fillers hold Qwen's merged-token ids; with no merges the model never produces them.
    vocab.update({f"<|unused_{i}|>": i for i in range(256, QWEN_FIRST_ADDED)})
    tok = _byte_level(vocab)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, special in QWEN_ADDED_TOKENS
                            if special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, special in QWEN_ADDED_TOKENS
                    if not special])
    for i, (t, _) in enumerate(QWEN_ADDED_TOKENS):
        if tok.token_to_id(t) != QWEN_FIRST_ADDED + i:
            raise ConfigError(f"Qwen-layout tokenizer put {t!r} at id {tok.token_to_id(t)}, "
                              f"expected {QWEN_FIRST_ADDED + i}")
    for field, t in _QWEN_CONFIG_TOKENS.items():  # presets.py writes these ids into the model config
        if tok.token_to_id(t) != QWEN_TOKEN_IDS[field]:
            raise ConfigError(f"{field}={QWEN_TOKEN_IDS[field]} in the config, but the tokenizer has {t!r} at "
                              f"{tok.token_to_id(t)}")
    return tok


def build_tiny_tokenizer() -> Tokenizer:
    """The tiny preset's tokenizer: 256 byte tokens, then Qwen's special tokens at ids 256 + i."""
    tok = _byte_level({ch: b for b, ch in bytes_to_unicode().items()})  # byte b -> id b
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
    ``AutoTokenizer.from_pretrained`` loads the tiny tokenizer offline without rebuilding its pipeline. The added
    tokens are the tokenizer's own, at their ids.
    """
    added = {str(i): dict(content=t.content, lstrip=t.lstrip, normalized=t.normalized, rstrip=t.rstrip,
                          single_word=t.single_word, special=t.special)
             for i, t in sorted(tokenizer.get_added_tokens_decoder().items())}
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
