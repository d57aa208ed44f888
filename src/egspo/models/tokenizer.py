"""The character-level tokenizer of the built-in tiny models.

One token per character of printable ASCII plus newline, so every prompt and answer of the built-in
tasks (Sudoku digit strings, Countdown expressions, GSM8K-style text) is representable and
``decode(encode(s)) == s`` holds exactly (no inserted spaces, no normalization). The answer-format tags
``<reasoning>``, ``</reasoning>``, ``<answer>``, ``</answer>`` are single tokens to keep sequences short.
Characters outside the alphabet become ``<|unk|>``.

Ids are fixed by construction (specials 0-3, characters 4-99, added tokens after) so that every build
gives the same tokenizer. Nothing is added around a sequence (no BOS/EOS): diffusion prompts are plain
text and the sampler fills ended completions with EOS itself. Padding is on the left, as generation needs.

A small chat template with role tokens lets task code format prompts with ``apply_chat_template`` for the
tiny models exactly as for LLaDA/Dream instruct checkpoints.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, EOS_TOKEN, MASK_TOKEN)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TAG_TOKENS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
CHARACTERS = ("\n", *(chr(code) for code in range(0x20, 0x7F)))

# Each message is its role token, its content and a newline; the generation prompt is the assistant role.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer (107 tokens); see the module docstring for its contract."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # Every character is its own word; Fuse joins decoded tokens without the WordLevel spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Role tokens are special (dropped by skip_special_tokens); tags are content and must survive decoding.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ROLE_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
