"""Code tasks (HumanEval, MBPP, KodCode): the completion's first ```python block runs against the tests.

One implementation, :class:`CodeTask`; the three built-in tasks differ only in the dataset field names
they read and in the prompt wording. Rows:

- ``question``: the problem statement (HumanEval: the signature and docstring);
- ``tests``: a list of assert statements (MBPP), or one test program: HumanEval's ``check(candidate)``
  (run as ``check(entry_point)``, one test) or pytest-style ``test_*`` functions (KodCode: each
  function, each parametrised case, counts as one test; fixtures are not provided, so tests that need
  one fail);
- ``entry_point``: the function HumanEval's ``check`` receives ("" otherwise);
- ``setup``: code run before the completion (HumanEval's prompt: its imports and helper functions;
  MBPP's ``test_setup_code``), "" when none;
- ``solution``: a reference solution, for supervised warm-up ("" when unknown).

Rewards (docs/algorithm.md#tasks-and-rewards): ``correctness`` = fraction of tests passed (weight 1.0),
``code_in_answer`` = 1 when that block sits inside ``<answer>`` (weight 0.5). The completion is executed once per row in
:func:`egspo.sandbox.run_python`, with the candidate's own output discarded; a small harness reports
each passed test on a private file descriptor, with a per-run random marker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from egspo.sandbox import run_python
from egspo.tasks.answers import clean_completion
from egspo.tasks.base import SYSTEM_PROMPT, RewardFunction, Task, chat, format_completion, percent_full, reject_options
from egspo.tasks.data import DataError, FieldError, check_split, get_field, load_rows, text_field

logger = logging.getLogger(__name__)

CODE_SYSTEM_PROMPT = (
    SYSTEM_PROMPT + "\nInside <answer>, give the complete Python solution in one ```python code block."
)

_CODE_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_REPORT = re.compile(r"^(\w+) (total|pass) (\d+)$", re.MULTILINE)

# The harness: runs the setup, the candidate and the tests in one interpreter. The candidate's
# stdout/stderr go to /dev/null (its prints must not fill the output cap or fake a report); results go
# to a duplicate of the original stdout, marked with a random token. Each step gets an alarm so that
# one looping test does not take the credit of the others.
_HARNESS = r'''
import os as _os, signal as _signal, sys as _sys, types as _types
_out = _os.dup(1)
_null = _os.open(_os.devnull, _os.O_WRONLY)
_os.dup2(_null, 1)
_os.dup2(_null, 2)
_TOKEN, _SETUP, _CODE, _TESTS, _ENTRY, _STEP_S = __PAYLOAD__


def _report(what, n):
    _os.write(_out, ("%s %s %d\n" % (_TOKEN, what, n)).encode())


def _on_alarm(*_):
    raise TimeoutError("test time limit")


_signal.signal(_signal.SIGALRM, _on_alarm)


def _guarded(fn, *args, **kwargs):
    try:
        _signal.setitimer(_signal.ITIMER_REAL, _STEP_S)
        try:
            fn(*args, **kwargs)
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        return True
    except BaseException:
        return False


def _exec(source, name, namespace):
    return _guarded(exec, compile(source, name, "exec"), namespace)


def _cases(fn):
    # pytest.mark.parametrize without pytest: one call per combination of parameter values.
    cases = [{}]
    for mark in getattr(fn, "pytestmark", []):
        if getattr(mark, "name", "") != "parametrize" or len(mark.args) < 2:
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
        expanded = []
        for item in mark.args[1]:
            if type(item).__name__ == "ParameterSet":  # pytest.param(...)
                values = tuple(item.values)
            else:
                values = (item,) if len(names) == 1 else tuple(item)
            expanded += [dict(case, **dict(zip(names, values))) for case in cases]
        cases = expanded
    return cases


def _method(cls, attr):
    return lambda **kwargs: getattr(cls(), attr)(**kwargs)


def _test_calls(namespace):
    calls = []
    for name, obj in list(namespace.items()):
        if name.startswith("test") and callable(obj) and not isinstance(obj, type):
            calls += [(obj, case) for case in _cases(obj)]
        elif name.startswith("Test") and isinstance(obj, type):
            for attr in dir(obj):
                if attr.startswith("test") and callable(getattr(obj, attr)):
                    calls += [(_method(obj, attr), case) for case in _cases(getattr(obj, attr))]
    return calls


_solution = _types.ModuleType("solution")  # KodCode's tests do "from solution import f"
_sys.modules["solution"] = _solution
_ns = _solution.__dict__
_loaded = _exec(_SETUP, "setup.py", _ns) and _exec(_CODE, "solution.py", _ns)
if isinstance(_TESTS, list):
    _report("total", len(_TESTS))
    for _i, _test in enumerate(_TESTS):
        if _loaded and _exec(_test, "test_%d.py" % _i, _ns):
            _report("pass", _i)
elif _ENTRY:
    _report("total", 1)
    if _loaded and _exec(_TESTS + "\n\ncheck(%s)\n" % _ENTRY, "test.py", _ns):
        _report("pass", 0)
else:
    _tns = {"__name__": "test_solution"}
    _calls = _test_calls(_tns) if _loaded and _exec(_TESTS, "test_solution.py", _tns) else []
    _report("total", max(len(_calls), 1))
    for _i, (_fn, _kwargs) in enumerate(_calls):
        if _guarded(_fn, **_kwargs):
            _report("pass", _i)
'''


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes conversational completions as lists of messages."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def first_code_block(text: str) -> str | None:
    """The code of the first complete ```python (or ```py) block, or None."""
    match = _CODE_BLOCK.search(clean_completion(text))
    return match.group(1) if match else None


def code_in_answer(text: str) -> bool:
    """Whether the first python block lies inside an ``<answer>`` block (one cut off at the end counts)."""
    text = clean_completion(text)
    match = _CODE_BLOCK.search(text)
    if match is None:
        return False
    for opening in re.finditer(re.escape("<answer>"), text):
        closing = text.find("</answer>", opening.end())
        if opening.end() <= match.start() and match.end() <= (len(text) if closing < 0 else closing):
            return True
    return False


def build_program(code: str, tests: list[str] | str, entry_point: str = "", setup: str = "",
                  token: str = "", step_timeout_s: float = 3.0) -> str:
    """The sandbox script that runs ``code`` against ``tests`` and reports passes marked with ``token``."""
    payload = (token, setup, code, tests, entry_point, float(step_timeout_s))
    return _HARNESS.replace("__PAYLOAD__", repr(payload), 1)


def parse_report(stdout: str, token: str) -> float:
    """Fraction of tests passed according to the harness lines marked with ``token``."""
    total, passed = 0, set()
    for mark, what, number in _REPORT.findall(stdout):
        if mark != token:
            continue
        if what == "total":
            total = int(number)
        else:
            passed.add(int(number))
    return len({i for i in passed if i < total}) / total if total else 0.0


class CodeTask(Task):
    """Python programming problems scored by their tests in the sandbox (see the module docstring)."""

    name = "code"
    answer_fields = ("tests", "entry_point", "setup")
    #: Dataset field names, ours first (our own jsonl format works for every code task).
    question_fields: tuple[str, ...] = ("question",)
    test_fields: tuple[str, ...] = ("tests",)
    setup_fields: tuple[str, ...] = ("setup",)
    solution_fields: tuple[str, ...] = ("solution",)
    #: The user message; ``{question}`` and ``{tests}`` (the asserts, one per line) are filled in.
    template = "{question}"
    default_sources: dict[str, str] = {}

    def __init__(self, timeout_s: float = 10.0, step_timeout_s: float = 3.0, memory_mb: int = 1024,
                 max_workers: int | None = None) -> None:
        # timeout_s bounds one completion's whole run; step_timeout_s each of: setup, solution, test.
        self.timeout_s = timeout_s
        self.step_timeout_s = step_timeout_s
        self.memory_mb = memory_mb
        self.max_workers = max_workers or max(1, min(8, os.cpu_count() or 1))
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._cache_lock = threading.Lock()

    # -- data -----------------------------------------------------------------------------------

    def load(self, source: str | None, split: str, n: int, seed: int, **options: Any) -> list[dict[str, Any]]:
        """Rows of a local file or hub dataset (the whole source: ``n`` and ``seed`` are for generators)."""
        reject_options(self, options)
        check_split(split)
        if source is None:
            if split not in self.default_sources:
                raise DataError(
                    f"{self.name} has no default {split} set: set the task's data file to a jsonl file with "
                    f"{'/'.join(self.question_fields)} and {'/'.join(self.test_fields)} fields."
                )
            source = self.default_sources[split]
        return load_rows(source, split, self.to_row)

    def to_row(self, fields: dict[str, Any]) -> dict[str, Any]:
        question = text_field(fields, *self.question_fields)
        solution = next((str(fields[f]) for f in self.solution_fields if fields.get(f)), "")
        return {"question": question, **self.parse_truth(fields), "solution": solution}

    def parse_truth(self, fields: dict[str, Any]) -> dict[str, Any]:
        tests = get_field(fields, *self.test_fields)
        if isinstance(tests, str) and tests.lstrip().startswith("["):
            try:  # a list stored as JSON text (csv files)
                tests = json.loads(tests)
            except ValueError:
                pass
        if isinstance(tests, (list, tuple)):
            tests = [str(t) for t in tests if str(t).strip()]
        if not tests or not isinstance(tests, (str, list)):
            raise FieldError(self.test_fields[0],
                             f"must be a test program or a non-empty list of asserts, got {tests!r}")
        entry_point = str(fields.get("entry_point") or "").strip()
        if entry_point and not entry_point.isidentifier():
            raise FieldError("entry_point", f"must be a function name, got {entry_point!r}")
        if entry_point and isinstance(tests, list):
            raise FieldError("entry_point", "applies to a check(candidate) test program, not to a list of asserts")
        setup = next((fields[f] for f in self.setup_fields if fields.get(f)), "")
        if isinstance(setup, (list, tuple)):  # sanitized MBPP: a list of import lines
            setup = "\n".join(str(line) for line in setup)
        return {"tests": tests, "entry_point": entry_point, "setup": setup}

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        if not row.get("solution"):
            return None
        return format_completion("The solution is below.", f"```python\n{row['solution'].strip()}\n```")

    def messages(self, row: dict[str, Any], for_eval: bool = False) -> list[dict[str, str]]:
        tests = row["tests"] if isinstance(row["tests"], list) else []
        return chat(self.template.format(question=row["question"].strip(), tests="\n".join(tests)), CODE_SYSTEM_PROMPT)

    # -- rewards --------------------------------------------------------------------------------

    def reward_functions(self) -> list[RewardFunction]:
        return [
            RewardFunction("correctness", self.correctness_reward, weight=1.0, correctness=True),
            RewardFunction("code_in_answer", code_in_answer_reward, weight=0.5),
        ]

    def correctness_reward(self, prompts: Sequence[Any], completions: Sequence[Any], tests: Sequence[Any],
                           entry_point: Sequence[str] | None = None, setup: Sequence[str] | None = None,
                           **_: Any) -> list[float | None]:
        """Fraction of the row's tests passed by the completion's first python block (0 without one)."""
        n = len(completions)
        entry_point = entry_point or [""] * n
        setup = setup or [""] * n
        return list(self.score([completion_text(c) for c in completions], tests, entry_point, setup))

    def score(self, completions: Sequence[str], tests: Sequence[Any], entry_points: Sequence[str],
              setups: Sequence[str]) -> list[float]:
        """Test fractions of completions, run in parallel in the sandbox; identical jobs run once."""
        jobs: dict[str, tuple[str, Any, str, str]] = {}
        keys: list[str | None] = []
        for completion, test, entry, setup in zip(completions, tests, entry_points, setups, strict=True):
            code = first_code_block(completion)
            if code is None:
                keys.append(None)
                continue
            key = json.dumps([code, test, entry or "", setup or ""])
            keys.append(key)
            jobs[key] = (code, test, entry or "", setup or "")
        with self._cache_lock:
            results = {k: self._cache[k] for k in jobs if k in self._cache}
        todo = [k for k in jobs if k not in results]
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(todo))) as pool:
                for key, value in zip(todo, pool.map(lambda k: self._run(*jobs[k]), todo)):
                    results[key] = value
            with self._cache_lock:
                for key in todo:
                    self._cache[key] = results[key]
                while len(self._cache) > 4096:  # completions repeat across steps and greedy rollouts
                    self._cache.popitem(last=False)
        return [0.0 if key is None else results[key] for key in keys]

    def _run(self, code: str, tests: Any, entry_point: str, setup: str) -> float:
        token = secrets.token_hex(8)
        program = build_program(code, tests, entry_point, setup, token, self.step_timeout_s)
        result = run_python(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        if result.reason and result.reason.startswith("sandbox error"):
            logger.warning("code task: %s", result.reason)
        return parse_report(result.stdout, token)

    def metrics(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        scores = self.score([completion_text(c) for c in completions], [r["tests"] for r in rows],
                            [r.get("entry_point", "") for r in rows], [r.get("setup", "") for r in rows])
        in_answer = code_in_answer_reward([], completions)
        return {
            "accuracy": percent_full(scores),
            "tests_passed": 100.0 * sum(scores) / max(len(scores), 1),
            "code_in_answer": 100.0 * sum(in_answer) / max(len(in_answer), 1),
        }


def code_in_answer_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """1 when the completion's first python block sits inside ``<answer>`` (the 0.5 format bonus)."""
    return [float(code_in_answer(completion_text(c))) for c in completions]


class HumanEvalTask(CodeTask):
    """OpenAI HumanEval: complete a function from its signature and docstring; ``check(candidate)`` tests."""

    name = "humaneval"
    question_fields = ("question", "prompt")
    test_fields = ("tests", "test")
    # The prompt holds imports and helper functions the completion may rely on without repeating.
    setup_fields = ("setup", "prompt")
    template = (
        "Complete the following Python function. Write the whole function, signature included.\n\n"
        "```python\n{question}\n```"
    )
    default_sources = {"test": "openai/openai_humaneval"}

    def to_row(self, fields: dict[str, Any]) -> dict[str, Any]:
        row = super().to_row(fields)
        if not row["solution"] and fields.get("canonical_solution") and fields.get("prompt"):
            row["solution"] = str(fields["prompt"]) + str(fields["canonical_solution"])
        return row


class MBPPTask(CodeTask):
    """MBPP: a one-sentence task; the prompt shows the assert tests (they name the function)."""

    name = "mbpp"
    question_fields = ("question", "text", "prompt")
    test_fields = ("tests", "test_list")
    setup_fields = ("setup", "test_setup_code", "test_imports")
    solution_fields = ("solution", "code")
    template = "{question}\nYour code should pass these tests:\n{tests}"
    default_sources = {"train": "google-research-datasets/mbpp:full", "test": "google-research-datasets/mbpp:full"}


class KodCodeTask(CodeTask):
    """KodCode: a programming question; pytest-style tests importing from ``solution``."""

    name = "kodcode"
    question_fields = ("question",)
    test_fields = ("tests", "test")
    template = "{question}\n\nWrite the solution as a Python module; the tests import it as `solution`."
    default_sources = {"train": "KodCode/KodCode-Light-RL-10K"}
