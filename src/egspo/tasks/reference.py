"""The ``reference`` scoring protocol: the decisions of the published d1 evaluation parser.

d1 (dllm-reasoning/d1, ``eval/parse_and_get_acc.py`` and its helpers; EGSPO evaluates with the same
parser) scores saved generations with its own extraction rules, which differ from ours (the
``default`` protocol) in many small ways: GSM8K takes the *first* ``\\boxed{}``, MATH500 compares
normalised strings, Countdown reads the first ``expression = number`` it finds, Sudoku tries five
regular expressions in turn. Published accuracies are only comparable to numbers computed the same
way, so this module re-implements every one of those decisions, quirks included, in our own code
(Countdown without ``eval``). Each quirk is listed in docs/tasks.md, "Scoring protocols".

The raw text is scored as given: d1 decodes with ``skip_special_tokens=False``, so its generations
still hold ``<|eot_id|>`` / ``<|endoftext|>``, which its Sudoku patterns use as terminators.

    reference_gsm8k_answer("so \\boxed{1,234} ...")            # 1.0 (first number of the box)
    reference_math_equivalent("0.5", "\\frac{1}{2}")            # True
    reference_countdown_correct("<answer>\\boxed{3+4*5}</answer>", [3, 4, 5], 23)   # True
    reference_sudoku_cells(completion, puzzle, solution)        # (right cells, empty cells)
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # the FIRST closed block (re.search)


def first_answer_block(text: str) -> str | None:
    """The stripped text of the first closed ``<answer>...</answer>`` block, or None."""
    match = _ANSWER_BLOCK.search(text)
    return match.group(1).strip() if match else None


def reference_boxed(text: str) -> str | None:
    """The "last boxed" answer as d1 reads it (its ``remove_boxed(last_boxed_only_string(text))``).

    - Any ``"\\boxed "`` (with a space) wins: the text after its last occurrence up to the next ``$``.
    - Else the last ``\\boxed`` (or, without one, the last ``\\fbox``) up to the ``}`` that brings the
      brace count back to zero; the ``\\boxed{`` ... ``}`` wrapper is removed (an ``\\fbox{}`` keeps it).
      None when that brace is never closed (d1's parser hits an exception there).
    - Without any box: the whole text.
    """
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return text
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                box = text[start:index + 1]
                return box[len("\\boxed{"):-1] if box.startswith("\\boxed{") else box
    return None


# ---------------------------------------------------------------------------------------------------
# GSM8K

_GSM8K_BOX = re.compile(r"\\boxed\{(.*?)\}")  # lazy, one line: the content up to the first "}"
_GSM8K_NUMBER = re.compile(r"-?\d+\.?\d*")
_GSM8K_TRUTH = re.compile(r"\s*\$?([\d,]+(?:\.\d+)?)")  # what d1 reads after "####": no sign


def _float_or_number(text: str, pick: int) -> float | None:
    """``float(text)`` (Python's rules: "1_000", "inf", "1e3" are numbers), else the ``pick``-th number."""
    try:
        return float(text)
    except ValueError:
        numbers = _GSM8K_NUMBER.findall(text)
        return float(numbers[pick]) if numbers else None


def reference_gsm8k_answer(text: str) -> float | None:
    """d1's GSM8K answer: the FIRST ``\\boxed{}`` holding a number, else the first closed ``<answer>``.

    A box counts when its stripped content is not empty or only dots, and is either a float or holds a
    number: its FIRST number then (``\\boxed{1,234}`` reads 1). The answer block is a float, or its
    LAST number.
    """
    for content in _GSM8K_BOX.findall(text):
        content = content.strip()
        if content and not re.fullmatch(r"\.+", content):
            value = _float_or_number(content, 0)
            if value is not None:
                return value
    block = first_answer_block(text)
    return _float_or_number(block, -1) if block else None


def reference_gsm8k_truth(answer: str) -> float | None:
    """The ground truth d1 compares against: the unsigned number at the start of ``answer``.

    d1 reads the dataset's ``#### N`` with a pattern that has no minus sign, so a negative answer has
    no ground truth and is never matched; neither is a missing one ("nan" from a d1 file's null).
    """
    match = _GSM8K_TRUTH.match(answer)
    if match is None:
        return None
    try:
        return float(match.group(1).replace(",", ""))
    except ValueError:  # only commas
        return None


def reference_gsm8k_correct(text: str, answer: str) -> bool:
    """Whether d1 counts the completion right: its answer equals the ground truth as floats (exactly)."""
    predicted, truth = reference_gsm8k_answer(text), reference_gsm8k_truth(answer)
    return predicted is not None and truth is not None and predicted == truth


# ---------------------------------------------------------------------------------------------------
# MATH500


class _Unnormalizable(Exception):
    """Where d1's string normaliser raises; its comparison then falls back to the raw strings."""


def reference_math_answer(text: str) -> str | None:
    """d1's MATH answer: :func:`reference_boxed`; when that is None or empty, the first closed
    ``<answer>`` block (stripped). With no box at all this is the whole completion."""
    answer = reference_boxed(text)
    if not answer:
        block = first_answer_block(text)
        if block is not None:
            return block
    return answer


def _fix_sqrt(text: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``: the one character after each ``\\sqrt`` is braced."""
    if "\\sqrt" not in text:
        return text
    first, *pieces = text.split("\\sqrt")
    out = first
    for piece in pieces:
        if not piece:  # "\sqrt" at the end: d1 indexes an empty string
            raise _Unnormalizable
        out += "\\sqrt" + piece if piece[0] == "{" else "\\sqrt{" + piece[0] + "}" + piece[1:]
    return out


def _fix_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; a ``\\frac`` followed by one
    character leaves the whole text unchanged."""
    first, *pieces = text.split("\\frac")
    out = first
    for piece in pieces:
        out += "\\frac"
        if not piece:
            raise _Unnormalizable
        if piece[0] == "{":
            out += piece
        elif len(piece) < 2:
            return text
        elif piece[1] == "{":
            out += "{" + piece[0] + "}" + piece[1:]
        else:
            out += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
    return out


def _fix_slash(text: str) -> str:
    """``a/b`` of two canonical integers -> ``\\frac{a}{b}``. Exactly one ``/`` between anything that
    Python's ``int()`` refuses (``\\pi/2``, ``1.5/2``, ``/2``) raises in d1."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise _Unnormalizable from None
    return f"\\frac{{{a}}}{{{b}}}" if text == f"{a}/{b}" else text


_MATH_DROPS = (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
               ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""))


def reference_math_normalize(text: str) -> str:
    """d1's ``strip_string``, step by step; :class:`_Unnormalizable` where it raises."""
    for old, new in _MATH_DROPS:  # in this order: "\\right" also eats the start of "\\rightarrow"
        text = text.replace(old, new)
    if "\\text{ " in text:  # units: everything from "\text{ " on goes; twice is an error
        parts = text.split("\\text{ ")
        if len(parts) != 2:
            raise _Unnormalizable
        text = parts[0]
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")  # a bare "%" stays
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> " 5" (at most two characters before "=")
        text = sides[1]
    text = _fix_fracs(_fix_sqrt(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_slash(text)


def reference_math_equivalent(predicted: str, reference: str) -> bool:
    """d1's ``is_equiv``: equal normalised strings; equal raw strings where either cannot be normalised."""
    try:
        return reference_math_normalize(predicted) == reference_math_normalize(reference)
    except _Unnormalizable:
        return predicted == reference


def reference_math_correct(text: str, answer: str) -> bool:
    predicted = reference_math_answer(text)
    return predicted is not None and reference_math_equivalent(predicted, answer)


# ---------------------------------------------------------------------------------------------------
# Countdown

_EXPRESSION_BEFORE_EQUALS = re.compile(r"([0-9+\-*/() ]+)=[0-9. ]+")
_EVAL_CHARS = re.compile(r"^[\d+\-*/().\s]+$")  # d1's whitelist before eval ("$" allows a final "\n")
_MAX_POWER_BITS = 100_000  # larger powers never come back to a target of a few numbers (d1 would hang)
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class _NotArithmetic(Exception):
    """Where d1's ``eval`` would raise (and it scores infinity)."""


def reference_countdown_expression(text: str) -> str:
    """The expression d1 checks: :func:`reference_boxed` (the first closed ``<answer>`` block or the
    whole text when the last box is unclosed; the whole text without a box), ``\\div \\times \\cdot``
    made ASCII, then the left side of the first ``expression = number`` found in it, if any."""
    expression = reference_boxed(text)
    if expression is None:
        block = first_answer_block(text)
        expression = block if block is not None else text
    expression = expression.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    match = _EXPRESSION_BEFORE_EQUALS.search(expression)
    return match.group(1).strip() if match else expression


def _power(base: Any, exponent: Any) -> Any:
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
            and exponent * math.log2(abs(base)) > _MAX_POWER_BITS):
        raise _NotArithmetic
    return base ** exponent


def python_arithmetic(expression: str) -> Any:
    """The value Python's ``eval`` gives a whitelisted expression (int, float or complex), computed from
    its syntax tree; :class:`_NotArithmetic` where ``eval`` would raise. Python's own semantics on
    purpose (``**``, ``//``, float division, leading zeros refused), as d1 evaluated with ``eval``."""
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _NotArithmetic from None

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            return _power(left, right) if isinstance(node.op, ast.Pow) else _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        raise _NotArithmetic  # "...", calls like "3(4)", starred "*3": errors for eval too

    try:
        return value(tree.body)
    except (ArithmeticError, TypeError, ValueError, RecursionError):  # 1/0, float overflow, ...
        raise _NotArithmetic from None


def reference_countdown_correct(text: str, numbers: Sequence[int], target: int) -> bool:
    """d1's decision: the digit runs of the expression are exactly ``numbers`` (so "2.5" counts as 2
    and 5), it is made of digits, ``+ - * / ( ) .`` and whitespace only, and ``eval`` gives a value
    within 1e-5 of ``target``."""
    expression = reference_countdown_expression(text)
    try:
        literals = sorted(int(run) for run in re.findall(r"\d+", expression))
    except ValueError:  # a digit run too long for int()
        return False
    if literals != sorted(numbers) or not _EVAL_CHARS.match(expression):
        return False
    try:
        result = python_arithmetic(expression.strip())
    except _NotArithmetic:
        return False
    return bool(abs(result - target) < 1e-5)


# ---------------------------------------------------------------------------------------------------
# Sudoku

_SUDOKU_PATTERNS = tuple(re.compile(pattern, re.DOTALL) for pattern in (
    r"<answer>.*?```\s*([\d\s]+)```",  # a fenced block of digits inside the answer
    r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)",  # the first answer, up to an end marker
    r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)",  # text after the first </answer>
    r".*?(\d{16})\s*</answer>",
    r"\b(\d{16})\b",
))
_CELLS = 16


def reference_sudoku_grid(text: str) -> str:
    """d1's Sudoku answer: the first of its five patterns whose group is not blank, whitespace removed
    (every other character, letters and separators included, keeps a cell position); "" for none."""
    for pattern in _SUDOKU_PATTERNS:
        match = pattern.search(text)
        if match and match.group(1).strip():
            return re.sub(r"\s", "", match.group(1).strip())
    return ""


def reference_sudoku_cells(text: str, puzzle: str, solution: str) -> tuple[int, int]:
    """(right empty cells, empty cells): the answer padded with "0" or cut to 16 characters, compared
    with the solution at the puzzle's empty cells."""
    empty = [i for i, cell in enumerate(puzzle) if cell == "0"]
    grid = reference_sudoku_grid(text)
    if not grid:
        return 0, len(empty)
    grid = grid[:_CELLS].ljust(_CELLS, "0")
    return sum(grid[i] == solution[i] for i in empty), len(empty)
