"""Code tasks: rows from the published HumanEval / MBPP / KodCode formats, test-fraction rewards, and
hostile completions that must score zero in time while this process is unharmed."""

from __future__ import annotations

import json
import os
import time

import pytest

import egspo.tasks.code as code_module
from egspo.tasks import get_task
from egspo.tasks.code import CodeTask, build_program, code_in_answer, first_code_block, parse_report
from egspo.tasks.data import DataError

MBPP_RAW = {
    "task_id": 2,
    "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))",
    "test_list": [
        "assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)",
        "assert similar_elements((1, 2, 3, 4), (5, 4, 3, 7)) == (3, 4)",
        "assert similar_elements((11, 12, 14, 13), (17, 15, 14, 13)) == (13, 14)",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}
HUMANEVAL_RAW = {
    "task_id": "HumanEval/0",
    "prompt": "def _double(x):\n    return 2 * x\n\n\ndef quadruple(x: int) -> int:\n"
              "    \"\"\"Four times x.\n    >>> quadruple(2)\n    8\n    \"\"\"\n",
    "canonical_solution": "    return _double(_double(x))\n",
    "test": "def check(candidate):\n    assert candidate(2) == 8\n    assert candidate(0) == 0\n"
            "    assert candidate(-1) == -4\n",
    "entry_point": "quadruple",
}
KODCODE_RAW = {
    "question": "Write a function `is_even(n)` that tells whether n is even.",
    "solution": "def is_even(n):\n    return n % 2 == 0",
    "test": (
        "import pytest\nfrom solution import is_even\n\n"
        "def test_zero():\n    assert is_even(0)\n\n"
        "@pytest.mark.parametrize('n, expected', [(2, True), (3, False), pytest.param(7, False)])\n"
        "def test_values(n, expected):\n    assert is_even(n) is expected\n\n"
        "class TestNegative:\n    def test_minus_two(self):\n        assert is_even(-2)\n"
    ),
    "test_info": [{"function_name": "is_even"}],
}


def answer(code: str, inside: bool = True) -> str:
    block = f"```python\n{code}\n```"
    if inside:
        return f"<reasoning>\nEasy.\n</reasoning>\n<answer>\n{block}\n</answer><|eot_id|>"
    return f"<reasoning>\n{block}\n</reasoning>\n<answer>\ndone\n</answer>"


def columns(rows):
    return {key: [row[key] for row in rows] for key in rows[0]}


def weighted(task, completions, rows):
    cols = columns(rows)
    totals = [0.0] * len(completions)
    for function in task.reward_functions():
        for i, value in enumerate(function.fn([""] * len(completions), completions, **cols)):
            totals[i] += function.weight * value
    return totals


def test_registry_and_reward_declaration():
    for name in ("humaneval", "mbpp", "kodcode"):
        task = get_task(name)
        assert isinstance(task, CodeTask) and task.name == name
        functions = {f.name: f for f in task.reward_functions()}
        assert functions["correctness"].correctness and functions["correctness"].weight == 1.0
        assert not functions["code_in_answer"].correctness and functions["code_in_answer"].weight == 0.5


def test_code_block_extraction():
    text = "<answer>\n```python\nx = 1\n```\n```python\nx = 2\n```\n</answer>"
    assert first_code_block(text) == "x = 1\n"
    assert first_code_block("```py\nprint(1)\n```") == "print(1)\n"
    assert first_code_block("```\nno language\n```") is None
    assert first_code_block("```python\ncut off") is None
    assert code_in_answer(text)
    assert code_in_answer("<answer>\n```python\nx = 1\n```")  # answer cut off after the block
    assert not code_in_answer(answer("x = 1", inside=False))
    assert not code_in_answer("```python\nx = 1\n```\n<answer>\n```python\nx = 2\n```\n</answer>")


def test_report_parsing_ignores_unmarked_lines():
    assert parse_report("tok total 4\ntok pass 0\ntok pass 0\ntok pass 2\nfake pass 3\n", "tok") == 0.5
    assert parse_report("tok pass 0\n", "tok") == 0.0  # no total: the harness never got going
    assert parse_report("tok total 2\ntok pass 7\n", "tok") == 0.0


def test_mbpp_rows_prompt_and_rewards(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(MBPP_RAW) + "\n")
    task = get_task("mbpp")
    rows = task.load(str(path), "test", n=0, seed=0)
    row = rows[0]
    assert row["tests"] == MBPP_RAW["test_list"] and row["entry_point"] == "" and row["solution"]
    prompt = task.messages(row)[-1]["content"]
    assert MBPP_RAW["text"] in prompt and MBPP_RAW["test_list"][0] in prompt
    partial = "def similar_elements(a, b):\n    s = tuple(sorted(set(a) & set(b)))\n    return s if s[0] != 13 else ()"
    completions = [
        task.reference_completion(row),  # the dataset's own solution passes
        answer(partial),  # 2 of 3 tests
        answer(MBPP_RAW["code"], inside=False),  # right, but not inside <answer>
        answer("def similar_elements(a, b):\n    return ()"),
        "I cannot write code.",
    ]
    assert task.correctness_reward([""] * 5, completions, **columns(rows * 5)) == pytest.approx(
        [1.0, 2 / 3, 1.0, 0.0, 0.0])
    assert weighted(task, completions, rows * 5) == pytest.approx([1.5, 2 / 3 + 0.5, 1.0, 0.5, 0.0])
    metrics = task.metrics(completions, rows * 5)
    assert metrics["accuracy"] == pytest.approx(40.0)
    assert metrics["tests_passed"] == pytest.approx(100 * (2 + 2 / 3) / 5)


def test_humaneval_check_program_with_prompt_helpers(tmp_path):
    path = tmp_path / "humaneval.jsonl"
    path.write_text(json.dumps(HUMANEVAL_RAW) + "\n")
    task = get_task("humaneval")
    row = task.load(str(path), "test", n=0, seed=0)[0]
    assert row["entry_point"] == "quadruple" and isinstance(row["tests"], str)
    assert HUMANEVAL_RAW["prompt"].strip() in task.messages(row)[-1]["content"]
    completions = [
        answer("def quadruple(x: int) -> int:\n    return _double(_double(x))"),  # helper from the prompt
        answer("def quadruple(x):\n    return 4 * x if x >= 0 else 0"),  # one assert fails: check fails
        task.reference_completion(row),
    ]
    assert task.correctness_reward([""] * 3, completions, **columns([row] * 3)) == [1.0, 0.0, 1.0]
    with pytest.raises(DataError, match="humaneval has no default train set"):
        task.load(None, "train", n=1, seed=0)


def test_kodcode_pytest_style_tests(tmp_path):
    path = tmp_path / "kodcode.jsonl"
    path.write_text(json.dumps(KODCODE_RAW) + "\n")
    task = get_task("kodcode")
    row = task.load(str(path), "train", n=0, seed=0)[0]
    completions = [
        answer(KODCODE_RAW["solution"]),
        answer("def is_even(n):\n    return n == 0 or n == 2"),  # zero, 2 and 3 and 7 right; -2 wrong
        answer("def something_else():\n    pass"),  # the test module's import fails
    ]
    # 5 tests: test_zero, three parametrised cases, TestNegative.test_minus_two
    assert task.correctness_reward([""] * 3, completions, **columns([row] * 3)) == pytest.approx([1.0, 0.8, 0.0])


def test_rows_validation():
    task = get_task("mbpp")
    with pytest.raises(DataError, match="field 'tests' .*test_list"):
        from egspo.tasks.data import Record, convert_records
        convert_records([Record("x.jsonl line 1", {"text": "q"})], task.to_row)
    with pytest.raises(ValueError, match="entry_point"):
        task.parse_truth({"tests": "def check(c): pass", "entry_point": "os.system('x')"})


HOSTILE = {
    "infinite loop": "def similar_elements(a, b):\n    while True:\n        pass",
    "loop at import": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "10 GB": "x = bytearray(10 * 1024**3)\ndef similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))",
    "huge output": "import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)\n    sys.stderr.write('y' * 10**6)",
    "secret": "import os\ndef similar_elements(a, b):\n"
              "    return tuple(sorted(set(a) & set(b))) if os.environ.get('EGSPO_TEST_SECRET') else None",
    "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)",
    "kill trainer": "import os, signal\nos.kill({trainer}, signal.SIGKILL)",
    "fake report": "import os\nfor fd in range(3, 10):\n    try:\n        os.write(fd, b'x total 1\\nx pass 0\\n')\n"
                   "    except OSError:\n        pass\nraise SystemExit(0)",
    "exit early": "import os\nos._exit(0)",
}


def test_hostile_completions_score_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("EGSPO_TEST_SECRET", "hunter2")
    target = tmp_path / "pwned.txt"
    hostile = dict(HOSTILE, **{"write outside": f"open({str(target)!r}, 'w').write('x')\n"
                                                "def similar_elements(a, b):\n"
                                                "    return tuple(sorted(set(a) & set(b)))"})
    task = CodeTask(timeout_s=3.0, step_timeout_s=1.0, memory_mb=512, max_workers=2)
    row = get_task("mbpp").to_row(MBPP_RAW)
    completions = [answer(code.format(trainer=os.getpid())) for code in hostile.values()]
    start = time.monotonic()
    scores = task.correctness_reward([""] * len(completions), completions, **columns([row] * len(completions)))
    elapsed = time.monotonic() - start
    assert dict(zip(hostile, scores)) == dict.fromkeys(hostile, 0.0)
    assert not target.exists()
    # 11 runs on 2 workers; the slowest ones stop at the 3 s deadline (or their 1 s step limit).
    assert elapsed < 3.0 * 6 + 5
    # And this process still works normally.
    assert task.correctness_reward([""], [answer(MBPP_RAW["code"])], **columns([row])) == [1.0]


def test_one_looping_test_does_not_take_the_others_credit():
    task = CodeTask(timeout_s=5.0, step_timeout_s=0.5)
    code = "def f(x):\n    while x == 2:\n        pass\n    return x"
    tests = ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"]
    assert task.score([answer(code)], [tests], [""], [""]) == pytest.approx([2 / 3])


def test_identical_jobs_run_once(monkeypatch):
    calls = []
    real = code_module.run_python

    def counting(program, **kwargs):
        calls.append(program)
        return real(program, **kwargs)

    monkeypatch.setattr(code_module, "run_python", counting)
    task = get_task("mbpp")
    row = task.to_row(MBPP_RAW)
    completions = [answer(MBPP_RAW["code"])] * 3 + ["no code"]
    assert task.score(completions, [row["tests"]] * 4, [""] * 4, [""] * 4) == [1.0, 1.0, 1.0, 0.0]
    assert task.score(completions[:1], [row["tests"]], [""], [""]) == [1.0]  # cached
    assert len(calls) == 1


def test_harness_program_is_plain_python():
    program = build_program("x = 1", ["assert x == 1"], token="t")
    compile(program, "harness", "exec")  # the payload is embedded as literals
