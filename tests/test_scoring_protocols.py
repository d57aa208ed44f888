"""The two scoring protocols: ``default`` (ours) and ``reference`` (the published d1 evaluation parser).

Each case is one where the protocols disagree (or a reference rule worth pinning), with the decision
the published parser makes derived by hand from its code (dllm-reasoning/d1 eval/parse_and_get_acc.py
and its helpers); the rule is in the test id or comment.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from egspo.cli import main
from egspo.scoring import score_completions, score_file
from egspo.tasks import get_task
from egspo.tasks.base import protocol_metrics, side_by_side_metrics
from egspo.tasks.reference import (
    python_arithmetic,
    reference_boxed,
    reference_countdown_expression,
    reference_gsm8k_answer,
    reference_math_normalize,
    reference_sudoku_grid,
)

PUZZLE, SOLUTION = "3102200002100320", "3142243142131324"  # empty cells: 2, 5, 6, 7, 8, 11, 12, 15


def decisions(task_name: str, completion: str, row: dict) -> tuple[float, float]:
    """(default accuracy, reference accuracy) of one completion."""
    task = get_task(task_name)
    return tuple(protocol_metrics(task, [completion], [row], p)["accuracy"] for p in ("default", "reference"))


# ---------------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize(
    "completion, answer, default, reference",
    [
        pytest.param("<reasoning>\nfirst guess \\boxed{5}\n</reasoning>\n<answer>\n\\boxed{7}\n</answer>", "7",
                     100.0, 0.0, id="reference-takes-the-first-box-not-the-last"),
        pytest.param("<answer>\n\\boxed{1,234}\n</answer>", "1234", 100.0, 0.0,
                     id="reference-float-fails-on-thousands-comma-so-reads-the-first-number-1"),
        pytest.param("<answer>\n\\boxed{-5}\n</answer>", "-5", 100.0, 0.0,
                     id="reference-truth-of-a-negative-answer-is-lost-by-the-unsigned-####-pattern"),
        pytest.param("<reasoning>\nr\n</reasoning>\n<answer>\n18", "18", 100.0, 0.0,
                     id="reference-needs-a-closed-answer-block-default-reads-a-cut-off-one"),
        pytest.param("<reasoning>\nso \\boxed{18} dollars\n</reasoning>\n"
                     "<answer>\n18 dollars, or 1800 cents\n</answer>",
                     "18", 0.0, 100.0, id="reference-first-box-beats-the-last-number-of-the-answer-block"),
        pytest.param("<answer>\nShe pays 3 times, 18 in total\n</answer>", "18", 100.0, 100.0,
                     id="both-read-the-last-number-of-an-answer-block-without-box"),
        pytest.param("<answer>\n\\boxed{...} then \\boxed{ 18.00 }\n</answer>", "18", 100.0, 100.0,
                     id="reference-skips-dots-only-boxes-and-compares-floats"),
    ],
)
def test_gsm8k_protocols(completion, answer, default, reference):
    assert decisions("gsm8k", completion, {"answer": answer}) == (default, reference)


def test_gsm8k_reference_answer_reading():
    # float() is tried first, with Python's own rules, so "1_000" is a thousand
    assert reference_gsm8k_answer("\\boxed{1_000}") == 1000.0
    # a box without a number is skipped; the first box with one wins, its FIRST number
    assert reference_gsm8k_answer("\\boxed{x} \\boxed{3 or 4} \\boxed{5}") == 3.0
    # the box content stops at the first "}" and never spans lines
    assert reference_gsm8k_answer("\\boxed{\\frac{1}{2}}") == 1.0
    assert reference_gsm8k_answer("\\boxed{\n7}<answer>8</answer>") == 8.0
    # only the FIRST closed <answer> block is read, its LAST number
    assert reference_gsm8k_answer("<answer>2 or 3</answer><answer>9</answer>") == 3.0
    assert reference_gsm8k_answer("no answer at all 42") is None


# ---------------------------------------------------------------------------------------------------
# MATH500


@pytest.mark.parametrize(
    "completion, answer, default, reference",
    [
        pytest.param("<answer>\n\\boxed{\\frac{2}{4}}\n</answer>", "\\frac{1}{2}", 100.0, 0.0,
                     id="reference-compares-strings-not-values"),
        pytest.param("<answer>\n\\boxed{3\\sqrt{2}}\n</answer>", "\\sqrt{18}", 100.0, 0.0,
                     id="reference-has-no-symbolic-equivalence"),
        pytest.param("<answer>\n\\boxed{5.0}\n</answer>", "5", 100.0, 0.0, id="reference-5.0-is-not-5"),
        pytest.param("<answer>\n\\frac{1}{2}\n</answer>", "\\frac{1}{2}", 100.0, 0.0,
                     id="reference-without-a-box-the-whole-completion-is-the-answer"),
        pytest.param("<answer>\n\\boxed{\\pi/2}\n</answer>", "\\frac{\\pi}{2}", 100.0, 0.0,
                     id="reference-one-slash-between-non-integers-raises-so-raw-strings-are-compared"),
        pytest.param("The answer is $\\boxed 5$.", "5", 0.0, 100.0,
                     id="reference-reads-boxed-space-up-to-the-dollar"),
        pytest.param("<answer>\n\\boxed{0.5}\n</answer>", "\\frac{1}{2}", 100.0, 100.0,
                     id="reference-maps-exactly-0.5-to-a-half"),
        pytest.param("<answer>\n\\boxed{\\dfrac12}\n</answer>", "\\frac{1}{2}", 100.0, 100.0,
                     id="reference-fixes-dfrac-and-unbraced-fracs"),
        pytest.param("\\boxed{\\frac{1}{3}} <answer>\n1/2\n</answer> and \\boxed{\\frac{1", "\\frac{1}{2}",
                     100.0, 100.0, id="reference-unclosed-last-box-falls-back-to-the-first-answer-block"),
    ],
)
def test_math500_protocols(completion, answer, default, reference):
    assert decisions("math500", completion, {"answer": answer}) == (default, reference)


def test_math500_reference_normalisation_rules():
    assert reference_math_normalize("k = 5") == "5"  # at most two characters before a single "="
    assert reference_math_normalize("area = 5") == "area=5"
    assert reference_math_normalize("5\\text{ cm}") == "5"  # units after "\text{ " are dropped
    assert reference_math_normalize("90^\\circ") == "90"
    assert reference_math_normalize("10\\%") == "10" and reference_math_normalize("10%") == "10%"
    assert reference_math_normalize(".5") == "\\frac{1}{2}"  # "0" prefixed, then the 0.5 rule
    assert reference_math_normalize("\\sqrt3") == "\\sqrt{3}"
    assert reference_math_normalize("\\frac1{72}") == "\\frac{1}{72}"
    assert reference_math_normalize("\\left(1,2\\right)") == "(1,2)"
    assert reference_math_normalize("-3/4") == "\\frac{-3}{4}"
    assert reference_math_normalize("03/4") == "03/4"  # not the canonical "3/4": left alone
    assert reference_boxed("\\fbox{5}") == "\\fbox{5}"  # an \fbox is found but not unwrapped
    assert reference_boxed("\\boxed{a{b}c} and \\boxed{d") is None  # the last box is unclosed


# ---------------------------------------------------------------------------------------------------
# Countdown

CD = {"numbers": [30, 100, 93], "target": 23}


@pytest.mark.parametrize(
    "completion, row, default, reference",
    [
        pytest.param("<answer>\n30-(100-93)\n</answer>", CD, 100.0, 0.0,
                     id="reference-without-a-box-checks-the-whole-completion-whose-tags-fail-the-whitelist"),
        pytest.param("<reasoning>\n30+93=123, 123-100=23\n</reasoning>\n<answer>\n\\boxed{30+93-100}\n</answer>",
                     CD, 100.0, 100.0, id="both-read-the-box"),
        pytest.param("<reasoning>\n30+93=123\n</reasoning>\n<answer>\n30+93-100\n</answer>", CD, 100.0, 0.0,
                     id="reference-without-a-box-takes-the-first-expression-before-an-equals-sign"),
        pytest.param("<answer>\n\\boxed{30 \u2212 (100 \u2212 93)}\n</answer>", CD, 100.0, 0.0,
                     id="reference-refuses-the-unicode-minus"),
        pytest.param("<answer>\n\\boxed{30 - (100 - 93) = 23}\n</answer>", CD, 100.0, 100.0,
                     id="both-drop-the-equals-target"),
        pytest.param("<answer>\n\\boxed{2**3*1}\n</answer>", {"numbers": [1, 2, 3], "target": 8}, 0.0, 100.0,
                     id="reference-evaluates-python-power"),
        pytest.param("<answer>\n\\boxed{2.5*4}\n</answer>", {"numbers": [2, 4, 5], "target": 10}, 0.0, 100.0,
                     id="reference-counts-digit-runs-so-2.5-uses-2-and-5"),
        pytest.param("<answer>\n\\boxed{30//1}\n</answer>", {"numbers": [1, 30], "target": 30}, 0.0, 100.0,
                     id="reference-evaluates-floor-division"),
        pytest.param("<answer>\n\\boxed{5/(5-5)}\n</answer>", {"numbers": [5, 5, 5], "target": 1}, 0.0, 0.0,
                     id="both-division-by-zero-is-wrong"),
        pytest.param("<answer>\n\\boxed{030-(100-93)}\n</answer>", CD, 0.0, 0.0,
                     id="both-python-syntax-refuses-leading-zeros"),
    ],
)
def test_countdown_protocols(completion, row, default, reference):
    assert decisions("countdown", completion, row) == (default, reference)


def test_countdown_reference_expression_and_arithmetic():
    assert reference_countdown_expression("\\boxed{3 \\times 4 \\div 2}") == "3 * 4 / 2"
    assert reference_countdown_expression("\\boxed{3+4} = 7") == "3+4"
    assert python_arithmetic("7/2") == 3.5 and python_arithmetic("-(2)**2") == -4
    assert isinstance(python_arithmetic("(-8)**0.5"), complex)  # as eval gives
    # a power far beyond any target is refused instead of computed for hours (eval would hang)
    assert decisions("countdown", "\\boxed{99**99**99}", {"numbers": [99, 99, 99], "target": 1}) == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------------
# Sudoku

SD = {"puzzle": PUZZLE, "solution": SOLUTION}


@pytest.mark.parametrize(
    "completion, default, reference",
    [
        pytest.param("<answer>\n3,1,4,2,2,4,3,1,4,2,1,3,1,3,2,4\n</answer>", 100.0, 0.0,
                     id="reference-keeps-separators-as-cells-only-whitespace-goes"),
        pytest.param("<answer>\nSolution: 3142243142131324\n</answer>", 100.0, 0.0,
                     id="reference-keeps-words-as-cells"),
        pytest.param("<answer>\n1111111111111111\n</answer> wait <answer>\n3142243142131324\n</answer>", 100.0, 25.0,
                     id="reference-reads-the-first-answer-block: ones-are-right-at-cells-7-and-12"),
        pytest.param("<answer></answer>\n3142243142131324", 0.0, 100.0,
                     id="reference-empty-answer-then-text-after-the-closing-tag"),
        pytest.param("<answer>\n3142 2431\n4213 1324\n</answer>", 100.0, 100.0, id="both-drop-whitespace"),
        pytest.param("<answer>\n3142243142131324<|eot_id|><|endoftext|>", 100.0, 100.0,
                     id="reference-eot-token-ends-an-unclosed-answer"),
        pytest.param("The grid: 3142243142131324.", 100.0, 100.0, id="both-find-a-bare-16-digit-run"),
        pytest.param("<answer>\n3142\n</answer>", 100 / 8, 100 / 8,
                     id="both-compare-a-short-answer-position-by-position"),
    ],
)
def test_sudoku_protocols(completion, default, reference):
    assert decisions("sudoku", completion, SD) == pytest.approx((default, reference))


def test_sudoku_reference_grid_patterns():
    # a fenced block of digits in the answer comes first
    assert reference_sudoku_grid("<answer>\nx\n```\n3142 2431\n```\n</answer>") == "31422431"
    # no terminator at all (special tokens skipped, cut off): only a word-bounded 16-digit run counts
    assert reference_sudoku_grid("<answer>\n3142243142131324") == "3142243142131324"
    assert reference_sudoku_grid("<answer>\n3142 2431 4213 1324") == ""


def test_sudoku_reference_metrics_pool_cells_and_count_puzzles():
    task = get_task("sudoku")
    completions = [f"<answer>{SOLUTION}</answer>", "<answer>3142</answer>"]
    assert task.reference_metrics(completions, [SD, SD]) == {"accuracy": pytest.approx(100 * 9 / 16),
                                                            "puzzle_accuracy": 50.0}


# ---------------------------------------------------------------------------------------------------
# Both protocols side by side, and scoring under a protocol


def test_side_by_side_names_the_other_protocol():
    task, rows = get_task("gsm8k"), [{"answer": "1234"}]
    completions = ["<answer>\\boxed{1,234}</answer>"]
    assert side_by_side_metrics(task, completions, rows) == {"accuracy": 100.0, "accuracy_reference": 0.0}
    assert side_by_side_metrics(task, completions, rows, primary="reference") == {
        "accuracy": 0.0, "accuracy_default": 100.0}
    with pytest.raises(ValueError, match="Unknown scoring protocol 'published'"):
        side_by_side_metrics(task, completions, rows, primary="published")


def test_tasks_without_a_published_parser_score_the_same_under_both(monkeypatch):
    task = get_task("custom")
    monkeypatch.setattr(task, "metrics", lambda completions, rows: {"accuracy": 40.0, "other": 1.0})
    assert task.reference_metrics(["x"], [{}]) is None
    assert protocol_metrics(task, ["x"], [{}], "reference") == {"accuracy": 40.0, "other": 1.0}
    assert side_by_side_metrics(task, ["x"], [{}]) == {
        "accuracy": 40.0, "other": 1.0, "accuracy_reference": 40.0, "other_reference": 1.0}


def test_score_completions_correct_follows_the_protocol():
    task = get_task("sudoku")
    completions = ["<answer>\nSolution: 3142243142131324\n</answer>", "<answer></answer>\n3142243142131324"]
    default = score_completions(task, completions, [SD, SD])
    reference = score_completions(task, completions, [SD, SD], protocol="reference")
    assert default.correct == [True, False] and reference.correct == [False, True]
    assert default.rewards == reference.rewards  # the training rewards do not depend on the protocol
    assert default.summary()["protocol"] == "default" and reference.summary()["protocol"] == "reference"
    assert reference.summary()["accuracy"] == 50.0


# ---------------------------------------------------------------------------------------------------
# d1 generations files


def _d1_file(path, items, gen_length=256):
    path.write_text(json.dumps({
        "generations": [{"question": q, "prompt_input": "<prompt>", "generations": g, "ground_truth": t}
                        for q, g, t in items],
        "metrics": {"wall_time": 1.0, "total_processed": len(items)},
        "model_path": "GSAI-ML/LLaDA-8B-Instruct", "checkpoint_path": "", "gen_length": gen_length,
        "diffusion_steps": gen_length // 2, "block_length": 32,
    }, indent=2))
    return str(path)


def _score(capsys, *argv):
    code = main(["score", *argv])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured)


def test_d1_gsm8k_file(tmp_path, capsys, caplog):
    eot = "<|eot_id|><|endoftext|><|endoftext|>"
    source = _d1_file(tmp_path / "gsm8k_instruct_256_128_0_generations.json", [
        ("q1", f"r\n</reasoning>\n<answer>\n\\boxed{{18}}\n</answer>{eot}", 18.0),
        ("q2", f"r\n</reasoning>\n<answer>\n\\boxed{{1,234}}\n</answer>{eot}", 1234.0),
        ("q3", f"r\n</reasoning>\n<answer>\n\\boxed{{-5}}\n</answer>{eot}", None),  # d1 lost the sign of -5
        ("q4", f"r\n</reasoning>\n<answer>\n\\boxed{{0.5}}\n</answer>{eot}", 0.5),
    ])
    out = tmp_path / "scored.jsonl"
    with caplog.at_level(logging.WARNING):
        code, summary = _score(capsys, "--task", "gsm8k", "--input", source, "--protocol", "reference",
                               "--output", str(out))
    assert code == 0 and summary["n"] == 4 and summary["protocol"] == "reference"
    assert summary["accuracy"] == 50.0  # 18 and 0.5; "1,234" reads 1; the lost -5 is never matched
    assert "1 item(s) have no ground truth" in caplog.text
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["correct"] for line in lines] == [True, False, False, True]
    assert lines[0]["question"] == "q1" and lines[0]["completion"].startswith("r\n") and "generations" not in lines[0]
    code, summary = _score(capsys, "--task", "gsm8k", "--input", source)
    assert summary["accuracy"] == 75.0 and summary["protocol"] == "default"  # only the lost -5 is wrong


def test_d1_math_countdown_sudoku_files(tmp_path, capsys):
    math = _d1_file(tmp_path / "math_instruct_512_256_0_generations.json", [
        ("p", "<answer>\n\\boxed{\\frac{2}{4}}\n</answer><|eot_id|>", "\\frac{1}{2}"),
        ("p", "<answer>\n\\boxed{\\dfrac{1}{2}}\n</answer><|eot_id|>", "\\frac{1}{2}"),
    ])
    assert _score(capsys, "--task", "math500", "--input", math, "--protocol", "reference")[1]["accuracy"] == 50.0
    assert _score(capsys, "--task", "math500", "--input", math)[1]["accuracy"] == 100.0

    countdown = _d1_file(tmp_path / "countdown_instruct_256_128_0_generations.json", [
        ("Numbers: [30, 100, 93]\nTarget: 23", "<answer>\n\\boxed{30-(100-93)}\n</answer>", [[30, 100, 93], 23]),
        ("Numbers: [1, 2, 3]\nTarget: 8", "<answer>\n\\boxed{2**3*1}\n</answer>", "not a list"),  # from question
    ])
    assert _score(capsys, "--task", "countdown", "--input", countdown, "--protocol", "reference")[1]["accuracy"] == 100
    assert _score(capsys, "--task", "countdown", "--input", countdown)[1]["accuracy"] == 50.0

    sudoku = _d1_file(tmp_path / "sudoku_instruct_128_64_0_generations.json", [
        (f"Solve the following Sudoku puzzle: {PUZZLE}\n", f"<answer>\n{SOLUTION}\n</answer>", SOLUTION),
        (f"{PUZZLE} as a string", "<answer>\nSolution: 3142243142131324\n</answer>", SOLUTION),
    ])
    summary = _score(capsys, "--task", "sudoku", "--input", sudoku, "--protocol", "reference")[1]
    assert summary["accuracy"] == 50.0 and summary["puzzle_accuracy"] == 50.0


def test_d1_files_of_several_processes_are_scored_together(tmp_path, capsys):
    parts = [_d1_file(tmp_path / f"gsm8k_instruct_128_64_{rank}_generations.json",
                      [("q", f"<answer>\\boxed{{{value}}}</answer>", 3.0)]) for rank, value in enumerate((3, 4, 3))]
    summary = _score(capsys, "--task", "gsm8k", "--input", *parts, "--protocol", "reference")[1]
    assert summary["n"] == 3 and summary["accuracy"] == pytest.approx(200 / 3)


def test_d1_file_errors(tmp_path, capsys, caplog):
    sudoku = _d1_file(tmp_path / "sudoku_x_128_64_0_generations.json", [("q", "g", SOLUTION)])
    assert main(["score", "--task", "gsm8k", "--input", sudoku]) == 2
    assert "d1 'sudoku' generations file: score it with --task sudoku" in caplog.text
    assert main(["score", "--task", "sudoku", "--input", sudoku]) == 2
    assert "item 0: field 'question' has no 16-digit Sudoku puzzle" in caplog.text
    gsm = _d1_file(tmp_path / "gsm8k_x_128_64_0_generations.json", [("q", "g", "18")])
    assert main(["score", "--task", "gsm8k", "--input", gsm]) == 2
    assert "item 0: field 'ground_truth' must be a number or null for gsm8k, got '18'" in caplog.text
    capsys.readouterr()


def test_our_json_list_files_are_not_mistaken_for_d1_files(tmp_path, capsys):
    path = tmp_path / "ours.json"
    path.write_text(json.dumps([{"completion": "<answer>\\boxed{1,234}</answer>", "answer": "1234"}]))
    assert _score(capsys, "--task", "gsm8k", "--input", str(path), "--protocol", "reference")[1]["accuracy"] == 0.0


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(tmp_path, capsys):
    lines = [json.dumps({"completion": f"<answer>{i}</answer>", "answer": str(i)}) for i in range(200)]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary = score_file(get_task("gsm8k"), path, progress=True)
    assert summary["n"] == 200 and summary["accuracy"] == 100.0
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no TTY: tqdm stays silent


# ---------------------------------------------------------------------------------------------------
# math-verify off the main thread


def test_math_verify_decides_the_same_in_a_worker_thread(caplog):
    pytest.importorskip("math_verify")
    from egspo.tasks.math import math_equivalent

    pairs = [("\\frac{2}{4}", "0.5"), ("3\\sqrt{2}", "\\sqrt{18}"), ("(1, 2]", "(1,2]"), ("3", "4"),
             ("x^2+2x+1", "(x+1)^2"), ("\\pi/2", "\\frac{\\pi}{2}")]
    main_thread = [math_equivalent(a, b) for a, b in pairs]
    assert main_thread == [True, True, True, False, True, True]
    with caplog.at_level(logging.WARNING, logger="egspo"), ThreadPoolExecutor(2) as pool:
        worker = list(pool.map(lambda pair: (threading.current_thread() is threading.main_thread(),
                                             math_equivalent(*pair)), pairs))
    assert [on_main for on_main, _ in worker] == [False] * len(pairs)
    assert [decision for _, decision in worker] == main_thread
    assert "comparing normalised strings" not in caplog.text  # no silent (or loud) fallback


def test_math500_scoring_from_a_worker_thread_matches_the_main_thread():
    pytest.importorskip("math_verify")
    task = get_task("math500")
    completions = ["<answer>\\boxed{\\frac{2}{4}}</answer>", "<answer>\\boxed{2\\sqrt{2}}</answer>",
                   "<answer>\\boxed{7}</answer>"]
    rows = [{"answer": "0.5"}, {"answer": "\\sqrt{8}"}, {"answer": "8"}]
    here = score_completions(task, completions, rows)
    with ThreadPoolExecutor(1) as pool:
        there = pool.submit(score_completions, task, completions, rows).result()
    assert here.correct == there.correct == [True, True, False]
    assert here.metrics == there.metrics


def test_a_math_verify_failure_is_logged_at_warning(monkeypatch, caplog):
    import egspo.tasks.math as math_task

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(math_task, "_math_verify", lambda: (broken, broken))
    with caplog.at_level(logging.WARNING, logger="egspo"):
        assert math_task.math_equivalent("\\dfrac{1}{2}", "0.5") is True  # the string fallback still decides
    assert "math-verify failed on" in caplog.text and "comparing normalised strings" in caplog.text
