"""GSM8K and MATH500: word problems with a numeric or LaTeX final answer.

Reward functions return values in [0, 1]; the weights carry the reference scale (GSM8K: correctness
2.0, four format rewards 0.5 each; MATH500: correctness 2.0, boxed-inside-<answer> 0.5), so weighted
totals equal the published ones. Rows: ``question`` and ``answer`` (GSM8K's ``#### N`` reduced to the
number; MATH500 reads ``problem``/``answer``).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from abc import abstractmethod
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, ClassVar

from egspo.tasks.answers import (
    clean_completion,
    final_answer,
    is_integer_text,
    last_answer_block,
    last_boxed,
    last_number_text,
    numbers_equal,
    parse_number,
)
from egspo.tasks.base import (
    SYSTEM_PROMPT,
    Parts,
    RewardFunction,
    Task,
    chat,
    format_completion,
    percent_full,
    reject_options,
)
from egspo.tasks.data import DataError, FieldError, check_split, load_rows, text_field
from egspo.tasks.reference import reference_gsm8k_correct, reference_math_correct

logger = logging.getLogger(__name__)

BOXED_SYSTEM_PROMPT = SYSTEM_PROMPT + "\nPut the final answer in \\boxed{} inside <answer>."

# The published format regexes lacked re.DOTALL, so any multi-line reasoning failed them
# (docs/algorithm.md#deliberate-differences-from-the-published-code).
_STRICT_FORMAT = re.compile(r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>", re.DOTALL)
_SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_XML_TAGS = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")


# ---------------------------------------------------------------------------------------------------
# Format rewards (GSM8K)


def xml_count_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """0.25 per format tag present exactly once, minus 0.004 per character of text after ``</answer>``."""
    scores = []
    for completion in completions:
        text = clean_completion(completion)
        score = 0.25 * sum(text.count(tag) == 1 for tag in _XML_TAGS)
        if "</answer>" in text:
            score -= 0.004 * len(text.rsplit("</answer>", 1)[1].strip())
        scores.append(score)
    return scores


def soft_format_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """1 when the completion starts with a reasoning block followed by an answer block."""
    return [float(_SOFT_FORMAT.match(clean_completion(c)) is not None) for c in completions]


def strict_format_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """1 when the completion is exactly the newline-separated reasoning and answer blocks."""
    return [float(_STRICT_FORMAT.fullmatch(clean_completion(c)) is not None) for c in completions]


def integer_answer_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """1 when the final answer is an integer (sign allowed: the published ``isdigit`` refused "-3")."""
    answers = [final_answer(c) for c in completions]
    return [float(a is not None and is_integer_text(a)) for a in answers]


def _final_answer_scores(
    completions: Sequence[str], references: Sequence[str], same: Callable[[str, str], bool]
) -> list[float]:
    """1 where the completion's final answer is ``same`` as the reference, else 0."""
    answers = [final_answer(c) for c in completions]
    return [float(bool(a and same(a, ref))) for a, ref in zip(answers, references)]


def same_number(predicted: str, reference: str) -> bool:
    """Whether the last number of ``predicted`` equals the reference number (sign kept)."""
    value = parse_number(predicted)
    return value is not None and numbers_equal(value, float(reference))


def gsm8k_correctness_reward(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_: Any
) -> list[float]:
    """1 when the last number of the final answer equals the reference number (sign kept)."""
    return _final_answer_scores(completions, answer, same_number)


def gsm8k_final_number(answer: str) -> str:
    """The reference number of a GSM8K answer ("...#### 1,234" -> "1234"); FieldError if there is none."""
    number = last_number_text(answer.split("####")[-1])
    if number is None:
        raise FieldError("answer", f"has no final number: {answer[-80:]!r}")
    return number


# ---------------------------------------------------------------------------------------------------
# MATH500 equivalence


MATH_VERIFY_TIMEOUT = 5  # seconds per parse / comparison, on the main thread only (see math_equivalent)


@functools.cache
def _math_verify() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        logger.warning("math-verify is not installed: MATH answers are compared by normalised strings "
                       "(pip install math-verify for symbolic equivalence).")
        return None
    return parse, verify


def math_equivalent(predicted: str, reference: str) -> bool:
    """Whether two final answers are equivalent: math-verify when installed, else :func:`latex_equivalent`.

    math-verify's timeouts use ``signal.alarm``, which works only on the main thread; elsewhere (a
    worker thread, a data loader) they are switched off, so it gives the same decisions there instead
    of failing. Any failure that still falls back to the string comparison is logged at WARNING.
    """
    functions = _math_verify()
    if functions is not None:
        parse, verify = functions
        timeout = MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None
        try:
            gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
            answer = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
            return bool(verify(gold, answer, timeout_seconds=timeout))
        except Exception:  # whatever math-verify raises, the answer is still compared, and we say so
            logger.warning("math-verify failed on %r vs %r; comparing normalised strings instead.",
                           predicted, reference, exc_info=True)
    return latex_equivalent(predicted, reference)


_LATEX_DROPS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "^{\\circ}", "^\\circ",
                "\\%", "%", "\\$", "$")
_FRAC_BRACED = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")
_SINGLE_TOKEN_PARENS = re.compile(r"\((-?[\w.]+)\)")


def normalize_latex(answer: str) -> str:
    """A canonical string of a simple LaTeX answer: ``\\dfrac{1}{2}``, ``\\frac12`` and ``1/2`` all give "1/2"."""
    text = answer.strip()
    text = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for drop in _LATEX_DROPS:
        text = text.replace(drop, "")
    text = re.sub(r"\s+|\\ ", "", text)
    text = re.sub(r"^[a-zA-Z]=", "", text)  # "x=5" -> "5"
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)  # \sqrt3 -> \sqrt{3}
    previous = None
    while previous != text:
        previous = text
        text = _FRAC_DIGITS.sub(r"\1/\2", _FRAC_BRACED.sub(r"(\1)/(\2)", text))
    text = _SINGLE_TOKEN_PARENS.sub(r"\1", text)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    return re.sub(r"(\d)\.0+\b", r"\1", text)


def _simple_value(text: str) -> Fraction | None:
    """The value of a normalised plain number or ratio of integers ("0.5", "-3/4"), else None."""
    if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        return Fraction(text)
    match = re.fullmatch(r"(-?\d+)/(\d+)", text)
    if match and int(match.group(2)) != 0:
        return Fraction(int(match.group(1)), int(match.group(2)))
    return None


def latex_equivalent(predicted: str, reference: str) -> bool:
    """Fallback equivalence: equal normalised strings, or equal values of plain numbers and fractions."""
    a, b = normalize_latex(predicted), normalize_latex(reference)
    if a == b:
        return True
    value_a, value_b = _simple_value(a), _simple_value(b)
    return value_a is not None and value_a == value_b


def math_correctness_reward(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_: Any
) -> list[float]:
    """1 when the final answer (last ``\\boxed{}`` in ``<answer>``) is equivalent to the reference."""
    return _final_answer_scores(completions, answer, math_equivalent)


def boxed_in_answer_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """1 when a complete ``\\boxed{}`` sits inside the last ``<answer>`` block.

    The published check tested ``"\\boxed" in text`` without a raw string: a backspace character, so
    it never matched (docs/algorithm.md#deliberate-differences-from-the-published-code).
    """
    blocks = [last_answer_block(c) for c in completions]
    return [float(block is not None and last_boxed(block) is not None) for block in blocks]


# ---------------------------------------------------------------------------------------------------
# Tasks


class _FinalAnswerTask(Task):
    """Shared by GSM8K and MATH500: question + answer rows from a file or a default hub dataset."""

    answer_fields = ("answer",)
    default_sources: ClassVar[dict[str, str]] = {}  # split -> hub dataset used when no source is given

    def load(self, source: str | None, split: str, n: int, seed: int, **options: Any) -> list[dict[str, Any]]:
        """Rows from ``source`` or the default hub dataset (``n`` and ``seed`` concern generators only)."""
        reject_options(self, options)
        check_split(split)
        if source is None:
            if split not in self.default_sources:
                setting = "task.train_file" if split == "train" else "task.eval_file"
                raise DataError(f"{self.name} has no default {split} set: set {setting} to a file or hub dataset.")
            source = self.default_sources[split]
        return load_rows(source, split, self.to_row)

    @abstractmethod
    def to_row(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A task row (question + ground truth) from a raw row; FieldError when malformed."""

    def metrics(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        correctness = next(f for f in self.reward_functions() if f.correctness)
        return {"accuracy": percent_full(correctness.fn([], completions, answer=[row["answer"] for row in rows]))}

    @abstractmethod
    def reference_correct(self, completion: str, answer: str) -> bool:
        """Whether the published parser counts ``completion`` right for a row's ``answer``."""

    def reference_parts(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[Parts]:
        return [(int(self.reference_correct(c, row["answer"])), 1) for c, row in zip(completions, rows)]


class GSM8KTask(_FinalAnswerTask):
    """Grade-school word problems; the answer is a number (``openai/gsm8k`` by default, needs datasets)."""

    name = "gsm8k"
    default_sources = {"train": "openai/gsm8k:main", "test": "openai/gsm8k:main"}

    def to_row(self, fields: dict[str, Any]) -> dict[str, Any]:
        # The worked solution before "####", without the "<<48/2=24>>" calculator annotations.
        solution, marker, _ = text_field(fields, "answer").partition("####")
        reasoning = re.sub(r"<<[^<>]*>>", "", solution).strip() if marker else ""
        return {"question": text_field(fields, "question"), **self.parse_truth(fields), "reasoning": reasoning}

    def parse_truth(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {"answer": gsm8k_final_number(text_field(fields, "answer"))}

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        """The dataset's worked solution as reasoning, when the row has one."""
        return format_completion(row["reasoning"], row["answer"]) if row.get("reasoning") else None

    def messages(self, row: dict[str, Any], for_eval: bool = False) -> list[dict[str, str]]:
        return chat(row["question"], BOXED_SYSTEM_PROMPT if for_eval else SYSTEM_PROMPT)

    def reference_correct(self, completion: str, answer: str) -> bool:
        return reference_gsm8k_correct(completion, answer)

    def reward_functions(self) -> list[RewardFunction]:
        return [
            RewardFunction("correctness", gsm8k_correctness_reward, weight=2.0, correctness=True),
            RewardFunction("xml_count", xml_count_reward, weight=0.5),
            RewardFunction("soft_format", soft_format_reward, weight=0.5),
            RewardFunction("strict_format", strict_format_reward, weight=0.5),
            RewardFunction("integer_answer", integer_answer_reward, weight=0.5),
        ]


class Math500Task(_FinalAnswerTask):
    """Competition problems with LaTeX answers; prompts always ask for ``\\boxed{}`` (the reward needs it).

    MATH-500 is a test set, so there is no default training data.
    """

    name = "math500"
    default_sources = {"test": "HuggingFaceH4/MATH-500"}

    def to_row(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {"question": text_field(fields, "problem", "question"), **self.parse_truth(fields)}

    def parse_truth(self, fields: dict[str, Any]) -> dict[str, Any]:
        if fields.get("answer") is None and fields.get("solution") is not None:
            # Full MATH solutions carry the answer in their last \boxed{}.
            answer = last_boxed(text_field(fields, "solution"))
            if not answer:
                raise FieldError("solution", "has no \\boxed{} answer")
            return {"answer": answer}
        return {"answer": text_field(fields, "answer").strip()}

    def messages(self, row: dict[str, Any], for_eval: bool = False) -> list[dict[str, str]]:
        return chat(row["question"], BOXED_SYSTEM_PROMPT)

    def reference_correct(self, completion: str, answer: str) -> bool:
        return reference_math_correct(completion, answer)

    def reward_functions(self) -> list[RewardFunction]:
        return [
            RewardFunction("correctness", math_correctness_reward, weight=2.0, correctness=True),
            RewardFunction("boxed_in_answer", boxed_in_answer_reward, weight=0.5),
        ]
