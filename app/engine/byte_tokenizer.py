"""An offline byte-level tokenizer for models with random weights (the `random:<preset>` sources).

Every byte is one token, so any text encodes and decodes back exactly, and no file or hub access is needed.
Id layout (vocab_size >= 260):

    0 <|endoftext|>   1 <|im_start|>   2 <|im_end|>   3 <|pad|>
    4 .. 259          the bytes 0x00 .. 0xFF (GPT-2's byte-to-unicode alphabet)
    260 .. V-1        <|filler_N|> tokens: never produced by encoding, but they decode (a random model may
                      generate them), so the vocab matches the model's embedding rows one to one.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID, PAD_ID = range(len(SPECIAL_TOKENS))
NUM_BYTES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTES

# ChatML, the format SmolLM2-Instruct uses, so prompts look alike across random and real models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's map from each byte to a printable character, indexed by byte value.

    The ByteLevel pre-tokenizer and decoder speak this alphabet, so the vocab must use it too.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(NUM_BYTES):
        if b not in chars:
            chars[b] = chr(NUM_BYTES + extra)
            extra += 1
    return [chars[b] for b in range(NUM_BYTES)]


def build_byte_tokenizer(vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: exactly `vocab_size` ids, eos `<|im_end|>`, pad `<|pad|>`, a chat template."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _bytes_to_unicode():
        vocab[ch] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"<|filler_{i}|>"] = i

    # No merges: each byte stays one token. Filler tokens are reachable only by id, which is what we want.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Already in the vocab, so they keep ids 0..3; registering them makes the text forms match atomically.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
