import pytest

from egspo.tasks.answers import (
    clean_completion,
    final_answer,
    is_integer_text,
    last_answer_block,
    last_boxed,
    last_number_text,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is -1,234.", -1234.0),
        ("$1,234,567.50 in total", 1234567.5),
        ("x = -3", -3.0),
        ("from 10-4 we get", 4.0),  # a dash between numbers is not a sign
        ("\u22127 degrees", -7.0),  # unicode minus
        ("(-12)", -12.0),
        ("first 3 then 5", 5.0),  # the last number wins
        (".5 of it", 0.5),
        ("no number here", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_last_number_text_is_plain_decimal():
    assert last_number_text("-1,234") == "-1234"


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{1} then \boxed{2}", "2"),  # several boxed answers: the last wins
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\sqrt{\frac{a}{b}}} and done", r"\sqrt{\frac{a}{b}}"),
        (r"\boxed{7} then \boxed{8", "7"),  # a cut-off last box: the last complete one counts
        (r"\fbox{3}", "3"),
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_clean_completion_removes_chat_special_tokens():
    text = "<|start_header_id|>assistant<|end_header_id|>\n<answer>5</answer><|eot_id|>" + "<|endoftext|>" * 20
    assert clean_completion(text) == "assistant\n<answer>5</answer>"
    assert clean_completion("<answer>1</answer></s><pad><pad>") == "<answer>1</answer>"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<reasoning>\nr\n</reasoning>\n<answer>\n42\n</answer>\nSome text after.", "42"),
        ("<answer>1</answer> retry <answer>2</answer>", "2"),  # the last block
        ("<answer>\n7\n<|eot_id|><|endoftext|><|endoftext|>", "7"),  # cut off: to the end
        ("<answer></answer>", ""),
        ("no tags at all", None),
    ],
)
def test_last_answer_block(text, expected):
    assert last_answer_block(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>\nSo \\boxed{-1,234}\n</answer><|eot_id|>", "-1,234"),  # boxed inside the block
        ("<answer>\n18\n</answer>", "18"),  # no box: the block
        ("Thus \\boxed{3} and \\boxed{4}.", "4"),  # no block: the last box anywhere
        ("\\boxed{9} <answer>\n10\n</answer>", "10"),  # the block wins over a box outside it
        ("just text 5", None),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize("text, expected", [("42", True), ("-42", True), ("1,234", True), (" 7 ", True),
                                            ("4.5", False), ("42 apples", False), ("", False)])
def test_is_integer_text(text, expected):
    assert is_integer_text(text) is expected
