import json

import pytest

from egspo.cli import main

PUZZLE, SOLUTION = "3102200002100320", "3142243142131324"


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _run(capsys, *argv):
    code = main(["score", *argv])
    return code, capsys.readouterr()


def test_score_sudoku_end_to_end(tmp_path, capsys):
    source = _write(tmp_path / "in.jsonl", [
        {"completion": f"<reasoning>\nr\n</reasoning>\n<answer>\n{SOLUTION}\n</answer><|eot_id|>",
         "puzzle": PUZZLE, "solution": SOLUTION, "id": 1},
        {"completion": "<answer>3142</answer>", "Puzzle": PUZZLE, "Solution": SOLUTION, "id": 2},
    ])
    out = tmp_path / "out.jsonl"
    code, captured = _run(capsys, "--task", "sudoku", "--input", source, "--output", str(out))
    assert code == 0
    summary = json.loads(captured.out)
    empty = PUZZLE.count("0")
    assert summary["n"] == 2
    assert summary["accuracy"] == pytest.approx(100 * (empty + 1) / (2 * empty))  # "3142" fills one empty cell
    assert summary["puzzle_accuracy"] == 50.0
    assert summary["rewards"] == {"correctness": pytest.approx((1 + 1 / empty) / 2)}
    assert summary["total"] == pytest.approx((1 + 1 / empty) / 2)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [1, 2]  # input fields are kept
    assert [line["correct"] for line in lines] == [True, False]
    assert lines[0]["rewards"] == {"correctness": 1.0} and lines[0]["total"] == 1.0


def test_score_countdown_end_to_end(tmp_path, capsys):
    source = _write(tmp_path / "in.jsonl", [
        {"completion": "<answer>\n30-(100-93)\n</answer>", "numbers": [30, 100, 93], "target": 23},
        {"completion": "<answer>\n30+100-93\n</answer>", "input": "30,100,93", "output": "23"},
        {"completion": "no answer", "numbers": [1, 2, 3], "target": 6},
        {"completion": "<answer>__import__('os').system('echo hi')</answer>", "numbers": [1], "target": 1},
    ])
    code, captured = _run(capsys, "--task", "countdown", "--input", source)
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["accuracy"] == 25.0 and summary["n"] == 4
    assert summary["rewards"]["correctness"] == pytest.approx((1.0 + 0.1 + 0.0 + 0.1) / 4)


def test_score_gsm8k_weighted_total(tmp_path, capsys):
    completion = "<reasoning>\nr\n</reasoning>\n<answer>\n-5\n</answer>"
    source = _write(tmp_path / "in.jsonl", [{"completion": completion, "answer": "#### -5"}])
    code, captured = _run(capsys, "--task", "gsm8k", "--input", source)
    summary = json.loads(captured.out)
    assert code == 0 and summary["accuracy"] == 100.0
    assert summary["total"] == pytest.approx(4.0)
    assert set(summary["rewards"]) == {"correctness", "xml_count", "soft_format", "strict_format", "integer_answer"}


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"completion": "x", "puzzle": PUZZLE, "solution": SOLUTION}, {"puzzle": PUZZLE, "solution": SOLUTION}],
         "in.jsonl line 2: field 'completion' is missing"),
        ([{"completion": "x", "puzzle": PUZZLE}], "in.jsonl line 1: field 'solution' is missing"),
        ([{"completion": "x", "puzzle": "123", "solution": SOLUTION}], "line 1: field 'puzzle' must be 16 characters"),
        ([{"completion": None, "puzzle": PUZZLE, "solution": SOLUTION}], "line 1: field 'completion' is missing"),
        ([{"completion": "x", "puzzle": PUZZLE, "solution": SOLUTION}, "{not json"], "in.jsonl line 2: invalid JSON"),
        ([], "has no lines to score"),
    ],
)
def test_score_malformed_input_exits_2(tmp_path, capsys, caplog, lines, message):
    source = _write(tmp_path / "in.jsonl", lines)
    code, captured = _run(capsys, "--task", "sudoku", "--input", source)
    assert code == 2 and captured.out == ""
    assert message in caplog.text


def test_score_protocols(tmp_path, capsys):
    source = _write(tmp_path / "in.jsonl", [
        {"completion": "<answer>\\boxed{1,234}</answer>", "answer": "#### 1,234"},  # reference reads 1
        {"completion": "<answer>\\boxed{5}</answer>", "answer": "#### 5"},
    ])
    out = tmp_path / "out.jsonl"
    code, captured = _run(capsys, "--task", "gsm8k", "--input", source, "--protocol", "reference", "--output", str(out))
    summary = json.loads(captured.out)
    assert code == 0 and summary["accuracy"] == 50.0 and summary["protocol"] == "reference"
    assert [json.loads(line)["correct"] for line in out.read_text().splitlines()] == [False, True]
    code, captured = _run(capsys, "--task", "gsm8k", "--input", source)
    assert json.loads(captured.out)["accuracy"] == 100.0 and json.loads(captured.out)["protocol"] == "default"
    with pytest.raises(SystemExit) as exc:
        main(["score", "--task", "gsm8k", "--input", source, "--protocol", "published"])
    assert exc.value.code == 2


def test_score_missing_file_and_unknown_task(tmp_path, capsys, caplog):
    code, _ = _run(capsys, "--task", "sudoku", "--input", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "does not exist" in caplog.text
    with pytest.raises(SystemExit) as exc:
        main(["score", "--task", "chess", "--input", "x.jsonl"])
    assert exc.value.code == 2


def test_score_task_without_reward_functions_exits_2(tmp_path, capsys, caplog):
    from egspo.tasks import TASK_NAMES

    if "custom" not in TASK_NAMES:
        pytest.skip("no custom task registered")
    source = _write(tmp_path / "in.jsonl", [{"completion": "x", "prompt": "p"}])
    code, captured = _run(capsys, "--task", "custom", "--input", source)
    assert code == 2 and captured.out == "" and "no reward functions" in caplog.text
