import json

import pytest

from egspo.tasks import get_task
from egspo.tasks.data import DataError
from egspo.tasks.math import (
    boxed_in_answer_reward,
    gsm8k_correctness_reward,
    integer_answer_reward,
    latex_equivalent,
    math_correctness_reward,
    soft_format_reward,
    strict_format_reward,
    xml_count_reward,
)

GOOD = "<reasoning>\nFirst line.\nSecond line.\n</reasoning>\n<answer>\n-1,234\n</answer>"


def _weighted(task, completion, **columns):
    return sum(f.weight * f.fn([""], [completion], **columns)[0] for f in task.reward_functions())


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (GOOD, "-1234", 1.0),  # sign and thousands comma kept
        (GOOD, "1234", 0.0),  # the published code lost the sign: -1234 must not match 1234
        ("<answer>\nThe total is $18.00.\n</answer>", "18", 1.0),
        ("<answer>\n\\boxed{72}\n</answer><|eot_id|><|endoftext|><|endoftext|>", "72", 1.0),
        ("<answer>\n5\n</answer>\nActually the answer is 6.", "5", 1.0),  # text after the answer ignored
        ("The answer is 5", "5", 0.0),  # no <answer> and no \boxed{}: no answer
        ("Therefore \\boxed{5}.", "5", 1.0),
        ("<answer>\n</answer>", "0", 0.0),
    ],
)
def test_gsm8k_correctness(completion, answer, expected):
    assert gsm8k_correctness_reward([""], [completion], answer=[answer]) == [expected]


def test_format_rewards_accept_multiline_reasoning_and_trailing_end_tokens():
    # The published regexes lacked DOTALL: multi-line reasoning failed both format rewards.
    completion = GOOD + "<|eot_id|>" + "<|endoftext|>" * 5
    assert soft_format_reward([""], [completion]) == [1.0]
    assert strict_format_reward([""], [completion]) == [1.0]
    assert xml_count_reward([""], [completion]) == [1.0]
    assert integer_answer_reward([""], [completion]) == [1.0]  # "-1,234": sign allowed


def test_format_rewards_refuse_bad_layouts():
    trailing = GOOD + "\nmore words"
    assert strict_format_reward([""], [trailing]) == [0.0]
    assert soft_format_reward([""], [trailing]) == [1.0]
    assert xml_count_reward([""], [trailing])[0] == pytest.approx(1.0 - 0.004 * len("more words"))
    assert soft_format_reward([""], ["<answer>1</answer>"]) == [0.0]
    assert xml_count_reward([""], ["<answer>1</answer>"]) == [0.0]
    assert integer_answer_reward([""], ["<answer>\n4.5\n</answer>"]) == [0.0]


def test_gsm8k_total_uses_reference_weights():
    task = get_task("gsm8k")
    assert _weighted(task, GOOD, answer=["-1234"]) == pytest.approx(2.0 + 4 * 0.5)
    assert [f.name for f in task.reward_functions() if f.correctness] == ["correctness"]


def test_gsm8k_rows_from_file(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "How much?", "answer": "She pays 3*<<3*4=12>>12.\n#### -1,200"}) + "\n")
    task = get_task("gsm8k")
    (row,) = task.load(str(path), "train", n=0, seed=0)
    assert row["answer"] == "-1200" and row["question"] == "How much?"
    assert task.reference_completion(row) == (
        "<reasoning>\nShe pays 3*12.\n</reasoning>\n<answer>\n-1200\n</answer>")
    assert "\\boxed{}" in task.messages(row, for_eval=True)[0]["content"]
    assert "\\boxed{}" not in task.messages(row)[0]["content"]
    assert task.messages(row)[1] == {"role": "user", "content": "How much?"}
    path.write_text(json.dumps({"question": "q", "answer": "#### none"}) + "\n")
    with pytest.raises(DataError, match="line 1: field 'answer' has no final number"):
        task.load(str(path), "train", n=0, seed=0)


def test_gsm8k_metrics():
    rows = [{"answer": "3"}, {"answer": "-4"}]
    assert get_task("gsm8k").metrics(["<answer>3</answer>", "<answer>4</answer>"], rows) == {"accuracy": 50.0}
    # the published parser: the first \boxed{} wins, and a negative ground truth is lost
    completions = ["\\boxed{3} <answer>\\boxed{3}</answer>", "<answer>\\boxed{-4}</answer>"]
    assert get_task("gsm8k").reference_metrics(completions, rows) == {"accuracy": 50.0}


def test_math500_reference_metrics_compare_normalised_strings():
    task, rows = get_task("math500"), [{"answer": "\\frac{1}{2}"}] * 2
    completions = ["<answer>\\boxed{\\dfrac12}</answer>", "<answer>\\boxed{\\frac{2}{4}}</answer>"]
    assert task.reference_metrics(completions, rows) == {"accuracy": 50.0}


@pytest.mark.parametrize(
    "predicted, reference, expected",
    [
        (r"\dfrac{1}{2}", "1/2", True),
        (r"\frac12", "0.5", True),
        (r"\left( 1, 2 \right)", "(1,2)", True),
        ("5.0", "5", True),
        ("x = 5", "5", True),
        (r"-\frac{1}{2}", r"\frac{-1}{2}", True),
        (r"90^\circ", "90", True),
        (r"\text{(C)}", "(C)", True),
        (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", True),
        ("1/3", "0.33", False),
        ("3", "4", False),
    ],
)
def test_latex_fallback_equivalence(predicted, reference, expected):
    assert latex_equivalent(predicted, reference) is expected


def test_math500_rewards():
    completion = "<reasoning>\nr\n</reasoning>\n<answer>\n\\boxed{1} no wait \\boxed{\\frac{1}{2}}\n</answer>"
    assert math_correctness_reward([""], [completion], answer=[r"\frac{1}{2}"]) == [1.0]
    assert math_correctness_reward([""], [completion], answer=["1"]) == [0.0]
    assert math_correctness_reward([""], ["no answer"], answer=["1"]) == [0.0]
    # The published check had a backspace ("\b") in place of "\\b", so it never saw a box.
    assert boxed_in_answer_reward([""], [completion, "\\boxed{1} <answer>1</answer>", "x"]) == [1.0, 0.0, 0.0]
    assert _weighted(get_task("math500"), completion, answer=["0.5"]) == pytest.approx(2.5)


def test_math500_with_math_verify():
    pytest.importorskip("math_verify")
    assert math_correctness_reward([""], ["<answer>\\boxed{\\frac{2}{4}}</answer>"], answer=["0.5"]) == [1.0]


def test_math500_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": " \\frac{1}{2} "}) + "\n"
                    + json.dumps({"problem": "p2", "solution": "so \\boxed{\\sqrt{2}}."}) + "\n")
    task = get_task("math500")
    rows = task.load(str(path), "test", n=0, seed=0)
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "\\sqrt{2}"]
    assert "\\boxed{}" in task.messages(rows[0])[0]["content"]
    with pytest.raises(DataError, match="math500 has no default train set: set task.train_file"):
        task.load(None, "train", n=1, seed=0)
    with pytest.raises(DataError, match="field 'answer' is missing"):
        task.parse_truth({"problem": "p"})


def test_math500_without_math_verify_uses_the_fallback(monkeypatch):
    import egspo.tasks.math as math_task

    monkeypatch.setattr(math_task, "_math_verify", lambda: None)
    completion = "<answer>\n\\boxed{\\dfrac{1}{2}}\n</answer>"
    assert math_correctness_reward([""], [completion, completion], answer=["0.5", "2"]) == [1.0, 0.0]
