import itertools
import json
from fractions import Fraction

import pytest

from egspo.tasks import get_task
from egspo.tasks.countdown import (
    WRONG_ANSWER_SCORE as WRONG,
    ExpressionError,
    countdown_reward,
    countdown_score,
    evaluate_expression,
    generate_countdown,
    solve_countdown,
)
from egspo.tasks.data import DataError, builtin_data_path

REFERENCE = builtin_data_path("builtin:countdown-test")  # shipped in the package


def _answer(text):
    return f"<reasoning>\nr\n</reasoning>\n<answer>\n{text}\n</answer>"


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("30-(100-93)", 1.0),
        ("30 - (100 - 93) = 23", 1.0),  # "=": the left side counts
        ("-(100-93)+30", 1.0),  # unary minus
        ("30-100+93", 1.0),
        ("30 \u2212 (100 \u2212 93)", 1.0),  # unicode minus
        ("30+100-93", WRONG),  # wrong value
        ("30-(100-93)+0", WRONG),  # an extra number
        ("100-93", WRONG),  # a number missing
        ("30-(100-93)/0", WRONG),  # division by zero
        ("__import__('os').system('true')", WRONG),  # never evaluated
        ("30-(100-93)**1", WRONG),
        ("max(30, 23)", WRONG),
        ("I do not know", WRONG),
        ("", 0.0),  # an empty answer is no answer
    ],
)
def test_countdown_score(answer, expected):
    assert countdown_score(_answer(answer), [30, 100, 93], 23) == expected


def test_countdown_score_without_answer_and_with_special_tokens():
    assert countdown_score("30-(100-93)", [30, 100, 93], 23) == 0.0
    completion = "<answer>\n30-(100-93)\n</answer>\nthat was easy<|eot_id|>" + "<|endoftext|>" * 10
    assert countdown_reward([""], [completion], numbers=[[30, 100, 93]], target=[23]) == [1.0]


def test_division_is_exact():
    # 8/(3-8/3) = 24 exactly; floating point would give 23.999999999999996.
    assert countdown_score(_answer("8/(3-8/3)"), [8, 3, 8, 3], 24) == 1.0
    assert evaluate_expression("8/(3-8/3)").value == 24


@pytest.mark.parametrize(
    "expression",
    ["__import__('os')", "().__class__", "2**3", "2//3", "2%3", "+3", "a+1", "(1, 2)", "1e3", "3 (4)",
     "[1]", "lambda: 1", "1" * 300, "(" * 150 + "1" + ")" * 150, "1 +", "0x10", "1_000"],
)
def test_parser_refuses_everything_but_arithmetic(expression):
    with pytest.raises(ExpressionError):
        evaluate_expression(expression)


def test_evaluation_records_literals_and_steps():
    evaluation = evaluate_expression("30-(100-93)")
    assert evaluation.literals == [30, 100, 93]
    assert evaluation.steps == ["100-93=7", "30-7=23"]
    assert evaluate_expression("1.5*2").value == Fraction(3)


def _reachable(numbers, target):
    """Independent brute force: every order, operator choice and tree shape."""
    ops = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / b if b else None]

    def values(items):
        if len(items) == 1:
            yield items[0]
            return
        for split in range(1, len(items)):
            for left in values(items[:split]):
                for right in values(items[split:]):
                    for op in ops:
                        if left is not None and right is not None:
                            yield op(left, right)

    return any(v == target for perm in itertools.permutations([Fraction(x) for x in numbers])
               for v in values(list(perm)))


@pytest.mark.parametrize("num_numbers", [3, 4])
def test_generated_targets_are_reachable(num_numbers):
    rows = generate_countdown(25 if num_numbers == 3 else 8, "train", seed=3, num_numbers=num_numbers)
    for row in rows:
        assert len(row["numbers"]) == num_numbers and all(1 <= x <= 100 for x in row["numbers"])
        assert isinstance(row["target"], int) and 1 <= row["target"] <= 100
        assert _reachable(row["numbers"], row["target"])
        assert countdown_score(_answer(row["expression"]), row["numbers"], row["target"]) == 1.0


def test_generator_is_deterministic_with_disjoint_splits():
    task = get_task("countdown")
    train = task.load(None, "train", n=300, seed=0)
    assert train == task.load(None, "train", n=300, seed=0)
    test = task.load(None, "test", n=100, seed=0)
    key = lambda row: (tuple(sorted(row["numbers"])), row["target"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert len({key(r) for r in train}) == 300
    assert train != task.load(None, "train", n=300, seed=1)
    with pytest.raises(ValueError, match="num_numbers"):
        task.load(None, "train", n=1, seed=0, num_numbers=5)


def test_rows_prompt_and_reference_completion():
    task = get_task("countdown")
    (row,) = task.load(None, "train", n=1, seed=0)
    question = f"Using the numbers {row['numbers']} once each with + - * /, make {row['target']}."
    assert task.messages(row)[1]["content"] == question
    completion = task.reference_completion(row)
    assert countdown_score(completion, row["numbers"], row["target"]) == 1.0
    assert task.reference_completion({"numbers": [1, 2], "target": 3}).endswith("<answer>\n1+2\n</answer>")
    assert task.reference_completion({"numbers": [1, 1], "target": 7}) is None


@pytest.mark.parametrize(("numbers", "target", "expected"), [
    ([30, 100, 93], 23, "30+93-100"),  # a + - chain without negative intermediates, not 30-(100-93)
    ([2, 3, 4], 24, "2*3*4"),  # + - first, then *, numbers in the given order
    ([56, 1, 26], 82, "56*1+26"),
    ([8, 3, 8, 3], 24, "8/(3-8/3)"),  # fractional intermediates only when nothing else works
    ([18, 12, 3], 2, "12*3/18"),  # the operator set decides first; within it * and / are not counted
    ([1, 1], 7, None),
])
def test_solve_countdown_finds_the_simplest_solution(numbers, target, expected):
    assert solve_countdown(numbers, target) == expected
    if expected is not None:
        assert countdown_score(_answer(expected), numbers, target) == 1.0


def test_solver_covers_generated_rows():
    for row in generate_countdown(200, "train", seed=5):
        expression = solve_countdown(row["numbers"], row["target"])
        assert countdown_score(_answer(expression), row["numbers"], row["target"]) == 1.0
        # never a larger operator set than the generating expression needs
        assert _tier(expression) <= _tier(row["expression"])


def _tier(expression: str) -> int:
    return 2 if "/" in expression else 1 if "*" in expression else 0


def test_file_formats_and_errors(tmp_path):
    path = tmp_path / "cd.jsonl"
    path.write_text('{"input": "30,100,93", "output": "23"}\n{"numbers": [1, 2, 3], "target": 6}\n'
                    '{"nums": [4, 5], "target": 20}\n')
    task = get_task("countdown")
    rows = task.load(str(path), "test", n=0, seed=0)
    assert [(r["numbers"], r["target"]) for r in rows] == [([30, 100, 93], 23), ([1, 2, 3], 6), ([4, 5], 20)]
    path.write_text('{"input": "30,100,93", "output": "23"}\n{"numbers": [1, "x"], "target": 6}\n')
    with pytest.raises(DataError, match=r"cd\.jsonl line 2: field 'numbers' must be an integer, got 'x'"):
        task.load(str(path), "test", n=0, seed=0)
    path.write_text('{"numbers": [1, 2]}\n')
    with pytest.raises(DataError, match=r"line 1: field 'target' is missing"):
        task.load(str(path), "test", n=0, seed=0)


def test_reference_test_set_loads():
    task = get_task("countdown")
    rows = task.load("builtin:countdown-test", "test", n=0, seed=0)
    first = json.loads(REFERENCE.read_text().splitlines()[0])
    assert len(rows) == 256
    assert rows[0]["numbers"] == [int(x) for x in first["input"].split(",")]
    assert rows[0]["target"] == int(first["output"])
    assert task.metrics(["<answer>30-(100-93)</answer>", "nothing"], rows[:2]) == {"accuracy": 50.0}
    # the published parser needs the expression in \boxed{} (without one it checks the whole completion)
    assert task.reference_metrics(["<answer>30-(100-93)</answer>", "nothing"], rows[:2]) == {"accuracy": 0.0}
    assert task.reference_metrics(["<answer>\\boxed{30-(100-93)}</answer>"], rows[:1]) == {"accuracy": 100.0}
