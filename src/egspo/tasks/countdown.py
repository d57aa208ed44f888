"""Countdown: combine the given numbers, each exactly once, with + - * / to reach the target.

Reward (reference values): 1.0 when the final answer is an expression that uses exactly the given
numbers once each and equals the target (|value - target| < 1e-5); 0.1 when an answer is present but
wrong (bad numbers, bad value, not an allowed expression, division by zero); 0 without an answer.
Expressions are evaluated exactly (fractions) by walking Python's AST with a whitelist of numbers,
+ - * /, parentheses and unary minus: never ``eval``. ``"3+4*5=23"`` is read as its left side.

Rows: ``question``, ``numbers`` (list of int), ``target`` (int); files may also use the reference
format ``{"input": "a,b,c", "output": "t"}`` or Countdown-Tasks' ``nums``. Generated rows also carry
``expression``, one solution (the one the target was built from). The SFT reference completion is
the simplest solution :func:`solve_countdown` finds (a left-to-right chain of + and - when there is
one), so any file of solvable problems can be used for SFT (an unsolvable row stops SFT with its row
number), and the model learns easy arithmetic first.
"""

from __future__ import annotations

import ast
import itertools
import operator
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from egspo.tasks.answers import final_answer
from egspo.tasks.base import Parts, RewardFunction, Task, chat, format_completion, percent_full, reject_options
from egspo.tasks.data import FieldError, as_int, check_split, generator_rng, get_field, load_rows, split_of
from egspo.tasks.reference import reference_countdown_correct

WRONG_ANSWER_SCORE = 0.1
NUMBER_RANGE = (1, 100)  # numbers and targets, as in the reference test set
_MAX_EXPRESSION_CHARS = 200  # bounds the parser's recursion and the size of exact intermediate values
_ALLOWED_CHARS = re.compile(r"[0-9 \t\n+\-*/().]+")
_SYMBOLS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "·": "*", "÷": "/", "−": "-"}
# applied to Fractions (the parser) and to ints or Fractions (the generator, :func:`_combine`)
_OPERATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
}
_AST_OPERATORS: dict[type[ast.operator], str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class ExpressionError(ValueError):
    """The text is not an arithmetic expression of numbers, + - * /, parentheses and unary minus."""


@dataclass(frozen=True)
class Evaluation:
    """An evaluated expression: its exact value, its number literals and each operation as "a-b=c"."""

    value: Fraction
    literals: list[Fraction]
    steps: list[str]


def evaluate_expression(expression: str) -> Evaluation:
    """Evaluate an arithmetic expression exactly; :class:`ExpressionError` for anything else."""
    if len(expression) > _MAX_EXPRESSION_CHARS or not _ALLOWED_CHARS.fullmatch(expression):
        raise ExpressionError(f"not an arithmetic expression: {expression[:50]!r}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError) as exc:
        raise ExpressionError(f"cannot parse {expression[:50]!r}") from exc
    literals: list[Fraction] = []
    steps: list[str] = []

    # The character whitelist already excludes names, calls and strings; the walk is what guarantees
    # that nothing but arithmetic on numbers is ever evaluated.
    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPERATORS:
            left, right = value(node.left), value(node.right)
            symbol = _AST_OPERATORS[type(node.op)]
            if symbol == "/" and right == 0:
                raise ExpressionError("division by zero")
            result = _OPERATIONS[symbol](left, right)
            steps.append(f"{left}{symbol}{right}={result}")
            return result
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            literals.append(Fraction(str(node.value)))
            return literals[-1]
        what = type(node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node).__name__
        raise ExpressionError(f"{what} is not allowed in an expression")

    return Evaluation(value(tree.body), literals, steps)


def extract_expression(completion: str) -> str | None:
    """The expression of the final answer: left of any ``=``, common operator symbols made ASCII."""
    answer = final_answer(completion)
    if not answer:
        return None
    for symbol, ascii_op in _SYMBOLS.items():
        answer = answer.replace(symbol, ascii_op)
    return answer.split("=", 1)[0].strip()


def countdown_score(completion: str, numbers: Sequence[int], target: int) -> float:
    """1.0 correct, 0.1 an answer that is wrong, 0.0 no answer (see the module docstring)."""
    expression = extract_expression(completion)
    if expression is None:
        return 0.0
    try:
        evaluation = evaluate_expression(expression)
    except ExpressionError:
        return WRONG_ANSWER_SCORE
    if sorted(evaluation.literals) == sorted(numbers) and abs(evaluation.value - target) < 1e-5:
        return 1.0
    return WRONG_ANSWER_SCORE


def countdown_reward(
    prompts: Sequence[str], completions: Sequence[str], numbers: Sequence[Sequence[int]],
    target: Sequence[int], **_: Any,
) -> list[float]:
    return [countdown_score(c, n, t) for c, n, t in zip(completions, numbers, target)]


# ---------------------------------------------------------------------------------------------------
# Generator

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


#: An expression term of the generator and the solver: (value, precedence of its outermost operator,
#: bad intermediates, node); the node is the number's text or (operator, left term, right term). Text
#: is made only when needed (:func:`_render`): the solver renders solutions only.
_Term = tuple[int | Fraction, int, int, Any]


def _combine(op: str, left: int | Fraction, right: int | Fraction) -> int | Fraction:
    """Exact ``left op right``: ints while the value is whole, a Fraction only after a real division."""
    value = Fraction(left) / right if op == "/" else _OPERATIONS[op](left, right)
    return int(value) if isinstance(value, Fraction) and value.denominator == 1 else value


def _render(term: _Term) -> str:
    """The text of a term, with only the parentheses its precedences need."""
    _, prec, _, node = term
    if isinstance(node, str):
        return node
    op, left, right = node
    left_text, right_text = _render(left), _render(right)
    if left[1] < prec:
        left_text = f"({left_text})"
    if right[1] < prec or (right[1] == prec and op in "-/"):
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def random_expression(rng: random.Random, numbers: Sequence[int]) -> tuple[str, Fraction]:
    """A random expression using each number once (any tree shape), with minimal parentheses."""
    terms: list[_Term] = [(int(x), _ATOM, 0, str(int(x))) for x in numbers]
    while len(terms) > 1:
        i, j = rng.sample(range(len(terms)), 2)
        left, right = terms[i], terms[j]
        op = rng.choice("+-*" if right[0] == 0 else "+-*/")
        combined = (_combine(op, left[0], right[0]), _PRECEDENCE[op], 0, (op, left, right))
        terms = [term for k, term in enumerate(terms) if k not in (i, j)] + [combined]
    return _render(terms[0]), Fraction(terms[0][0])


def _combinations(terms: list[_Term], ops: str) -> Iterator[_Term]:
    """Every way to combine ``terms`` into one with ``ops``, in a fixed order: pairs by position (the
    earlier term on the left first), then ``ops`` in order. For + and * only the earlier-left order of a
    pair is made: the swapped one has the same value, intermediates and parentheses and comes later, so
    it could never be preferred."""
    if len(terms) == 1:
        yield terms[0]
        return
    for i, j in itertools.permutations(range(len(terms)), 2):
        left, right = terms[i], terms[j]
        rest = [term for k, term in enumerate(terms) if k not in (i, j)]
        for op in ops:
            if (i > j and op in "+*") or (op == "/" and right[0] == 0):
                continue
            value = _combine(op, left[0], right[0])
            bad = left[2] + right[2] + int(value < 0 or isinstance(value, Fraction))
            yield from _combinations([(value, _PRECEDENCE[op], bad, (op, left, right)), *rest], ops)


def solve_countdown(numbers: Sequence[int], target: int) -> str | None:
    """The simplest expression that uses each number once and equals ``target``, or None.

    Simplest, in this order: the smallest set of operators that has a solution (+ -, then + - *, then
    all four), then the fewest negative or fractional intermediate results, the fewest parentheses,
    and the first in a fixed search order that keeps the given order of the numbers. With + and -
    alone this is a left-to-right chain, such as ``30+93-100`` for 30, 100, 93 -> 23. Within a set,
    the count of * and / is not minimised (18, 12, 3 -> 2 gives ``12*3/18``, not ``(18-12)/3``).
    Deterministic; at most 183 candidates for 3 numbers and 5,526 for 4 (about 10 ms).
    """
    terms: list[_Term] = [(int(x), _ATOM, 0, str(int(x))) for x in numbers]
    for ops in ("+-", "+-*", "+-*/"):
        best: tuple[int, int, str] | None = None
        for term in _combinations(terms, ops):
            if term[0] == target:
                text = _render(term)
                key = (term[2], text.count("("), text)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is not None:
            return best[2]
    return None


def countdown_question(numbers: Sequence[int], target: int) -> str:
    return f"Using the numbers {list(numbers)} once each with + - * /, make {target}."


def generate_countdown(n: int, split: str, seed: int, num_numbers: int = 3) -> list[dict[str, Any]]:
    """``n`` distinct problems whose target (a positive integer up to 100) is reachable by construction."""
    rng = generator_rng("countdown", split, seed)
    low, high = NUMBER_RANGE
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < n:
        numbers = [rng.randint(low, high) for _ in range(num_numbers)]
        expression, value = random_expression(rng, numbers)
        if value.denominator != 1 or not low <= value <= high:
            continue
        target = int(value)
        key = f"{sorted(numbers)}={target}"
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        rows.append({"question": countdown_question(numbers, target), "numbers": numbers, "target": target,
                     "expression": expression})
    return rows


# ---------------------------------------------------------------------------------------------------
# Task


class CountdownTask(Task):
    name = "countdown"
    answer_fields = ("numbers", "target")

    def load(
        self, source: str | None, split: str, n: int, seed: int, num_numbers: int = 3, **options: Any
    ) -> list[dict[str, Any]]:
        """Rows from ``source``, or ``n`` generated problems of ``num_numbers`` (3 or 4) numbers."""
        reject_options(self, options)
        check_split(split)
        if source is not None:
            return load_rows(source, split, self.to_row)
        if num_numbers not in (3, 4):
            raise ValueError(f"countdown option num_numbers={num_numbers!r} must be 3 or 4.")
        return generate_countdown(n, split, seed, num_numbers)

    def to_row(self, fields: dict[str, Any]) -> dict[str, Any]:
        truth = self.parse_truth(fields)
        return {"question": countdown_question(truth["numbers"], truth["target"]), **truth}

    def parse_truth(self, fields: dict[str, Any]) -> dict[str, Any]:
        raw = get_field(fields, "numbers", "nums", "input")
        if isinstance(raw, str):
            items: list[Any] = [item for item in re.split(r"[,\s]+", raw.strip(" []")) if item]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise FieldError("numbers", f"must be a list of integers or 'a,b,c', got {raw!r}")
        if not items:
            raise FieldError("numbers", "is empty")
        numbers = [as_int(item, "numbers") for item in items]
        return {"numbers": numbers, "target": as_int(get_field(fields, "target", "output"), "target")}

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        """The simplest solution (:func:`solve_countdown`), its operations as reasoning; None if unsolvable."""
        expression = solve_countdown(row["numbers"], row["target"])
        if expression is None:
            return None
        return format_completion("\n".join(evaluate_expression(expression).steps), expression)

    def messages(self, row: dict[str, Any], for_eval: bool = False) -> list[dict[str, str]]:
        return chat(row["question"])

    def reward_functions(self) -> list[RewardFunction]:
        return [RewardFunction("correctness", countdown_reward, weight=1.0, correctness=True)]

    def metrics(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        scores = [countdown_score(c, row["numbers"], row["target"]) for c, row in zip(completions, rows)]
        return {"accuracy": percent_full(scores)}

    def reference_parts(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[Parts]:
        return [(int(reference_countdown_correct(c, row["numbers"], row["target"])), 1)
                for c, row in zip(completions, rows)]
