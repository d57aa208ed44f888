"""Answer extraction shared by the tasks: chat special tokens, ``<answer>`` blocks, ``\\boxed{}``, numbers.

Completions come straight from a diffusion sampler, so they may carry chat special tokens anywhere
(``<|eot_id|>``, runs of ``<|endoftext|>``, ``<|mdm_mask|>``), text after ``</answer>``, or be cut off.

    final_answer("<reasoning>\\n...\\n</reasoning>\\n<answer>\\n\\\\boxed{-1,234}\\n</answer><|eot_id|>")
    # '-1,234'
    parse_number("-1,234")   # -1234.0
"""

from __future__ import annotations

import re

# Special tokens of the chat templates we meet (LLaDA, Dream, Llama, Qwen: all <|...|>) plus the
# sentencepiece-style ones; deleting them everywhere matches decoding with skip_special_tokens.
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>|</s>|<s>|<pad>|<eos>|<mask>")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A sign counts only when it does not follow a word or a closing bracket ("10-4" is 10 and 4).
_NUMBER = re.compile(r"(?<![\w.)\]])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])\.\d+")
_INTEGER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)")


def clean_completion(text: str) -> str:
    """The completion without chat special tokens and surrounding whitespace."""
    return _SPECIAL_TOKEN.sub("", text).strip()


def last_answer_block(text: str) -> str | None:
    """The stripped text after the last ``<answer>`` up to ``</answer>`` (or the end when cut off).

    None when there is no ``<answer>`` tag at all; text after ``</answer>`` is ignored.
    """
    text = clean_completion(text)
    start = text.rfind("<answer>")
    if start < 0:
        return None
    return text[start + len("<answer>"):].split("</answer>", 1)[0].strip()


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (nested braces allowed), or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for index in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return text[match.end():index].strip()
    return None


def final_answer(text: str) -> str | None:
    """The final answer: the last ``\\boxed{}`` of the last ``<answer>`` block, else that block's text,
    else (no ``<answer>`` tag) the last ``\\boxed{}`` anywhere; None when there is none."""
    block = last_answer_block(text)
    if block is None:
        return last_boxed(clean_completion(text))
    boxed = last_boxed(block)
    return boxed if boxed is not None else block


def last_number_text(text: str) -> str | None:
    """The last number in ``text`` as plain decimal text: sign kept, thousands commas removed."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").replace("\u2212", "-")


def parse_number(text: str) -> float | None:
    """The value of the last number in ``text`` (``"x = -1,234.5 apples"`` -> -1234.5), or None."""
    number = last_number_text(text)
    return None if number is None else float(number)


def numbers_equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def is_integer_text(text: str) -> bool:
    """Whether ``text`` is exactly an integer, sign and thousands commas allowed."""
    return _INTEGER.fullmatch(text.strip()) is not None
