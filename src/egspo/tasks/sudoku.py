"""4x4 Sudoku: fill the empty cells (``0``) of a 16-character grid, read row by row.

Reward (reference): the fraction of originally empty cells filled correctly. The answer is the digits
of the last ``<answer>`` block (separators such as spaces, newlines, commas or pipes are ignored; the
first 16 digits count, a short answer is compared position by position); without an ``<answer>`` tag,
the last run of 16 or more digits (separators allowed) counts. Evaluation accuracy is the cell-level
rate over all empty cells of the set (reference protocol); ``puzzle_accuracy`` counts fully solved
puzzles.

Rows: ``question``, ``puzzle``, ``solution``; files may use the reference CSV columns
``Puzzle,Solution``. The generator needs no download: a uniformly random solution grid, then cells
removed in random order while the solution stays unique (checked by a backtracking solver).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from egspo.tasks.answers import clean_completion, last_answer_block
from egspo.tasks.base import Parts, RewardFunction, Task, chat, format_completion, pooled_percent, reject_options
from egspo.tasks.data import FieldError, check_split, generator_rng, load_rows, split_of, text_field
from egspo.tasks.reference import reference_sudoku_cells

CELLS = 16
MAX_BLANKS = 12  # a 4x4 Sudoku with a unique solution needs at least 4 givens
DEFAULT_BLANKS = 8  # as in the reference test set
_MAX_MISSES = 10_000  # consecutive duplicate or other-split puzzles before giving up

# Every 4x4 grid is one of these two up to band/stack/row/column/digit permutations and transposition;
# their classes hold 96 and 192 of the 288 grids, so choosing them 1:2 makes grids uniformly random.
_BASE_GRIDS = ("1234341221434321", "1234341223414123")
_BASE_WEIGHTS = (1, 2)
_PEERS = tuple(
    tuple(
        j for j in range(CELLS)
        if j != i and (j // 4 == i // 4 or j % 4 == i % 4 or (j // 8, j % 4 // 2) == (i // 8, i % 4 // 2))
    )
    for i in range(CELLS)
)
_DIGIT = re.compile(r"[0-9]")
_GRID_RUN = re.compile(r"[0-9](?:[\s,|;:.\-+_/\[\]]*[0-9]){15,}")


# ---------------------------------------------------------------------------------------------------
# Grids and the generator


def is_valid_grid(grid: str) -> bool:
    """Whether a full 16-digit grid satisfies the row, column and box constraints."""
    return all(grid[i] != grid[j] for i in range(CELLS) for j in _PEERS[i])


def count_solutions(cells: Sequence[int], limit: int = 2) -> int:
    """How many ways the empty cells (0) can be filled, counting no further than ``limit``."""
    grid = list(cells)

    def search() -> int:
        if 0 not in grid:
            return 1
        cell = grid.index(0)
        used = {grid[j] for j in _PEERS[cell]}
        found = 0
        for digit in range(1, 5):
            if digit not in used:
                grid[cell] = digit
                found += search()
                if found >= limit:
                    break
        grid[cell] = 0
        return found

    return search()


def random_solution(rng: random.Random) -> str:
    """A uniformly random valid 4x4 grid."""
    base = rng.choices(_BASE_GRIDS, weights=_BASE_WEIGHTS)[0]

    def line_order() -> list[int]:  # permute the two bands, then the two lines inside each band
        return [band + line for band in rng.sample([0, 2], 2) for line in rng.sample([0, 1], 2)]

    rows, cols = line_order(), line_order()
    digits = dict(zip("1234", rng.sample("1234", 4)))
    grid = [digits[base[4 * r + c]] for r in rows for c in cols]
    if rng.random() < 0.5:
        grid = [grid[4 * c + r] for r in range(4) for c in range(4)]
    return "".join(grid)


def make_puzzle(rng: random.Random, blanks: int) -> tuple[str, str]:
    """A (puzzle, solution) pair with exactly ``blanks`` empty cells and a unique solution."""
    while True:  # a removal order can get stuck before `blanks` cells (only for many blanks): retry
        solution = random_solution(rng)
        cells = [int(c) for c in solution]
        removed = 0
        for cell in rng.sample(range(CELLS), CELLS):
            digit, cells[cell] = cells[cell], 0
            if count_solutions(cells) == 1:
                removed += 1
                if removed == blanks:
                    return "".join(map(str, cells)), solution
            else:
                cells[cell] = digit


def sudoku_question(puzzle: str) -> str:
    return f"Solve this 4x4 Sudoku (0 = empty): {puzzle}"


def generate_sudoku(n: int, split: str, seed: int, blanks: int = DEFAULT_BLANKS) -> list[dict[str, Any]]:
    """``n`` distinct puzzles of the split (train and test puzzles never coincide)."""
    rng = generator_rng("sudoku", split, seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    misses = 0
    while len(rows) < n:
        puzzle, solution = make_puzzle(rng, blanks)
        if puzzle in seen or split_of(puzzle) != split:
            # Few puzzles exist with many blanks (25,728 with 12, a tenth of them test): stop, not hang.
            misses += 1
            if misses > _MAX_MISSES:
                raise ValueError(
                    f"Found only {len(rows)} distinct {split} Sudoku puzzles with {blanks} blanks; "
                    "ask for fewer problems or fewer blanks."
                )
            continue
        misses = 0
        seen.add(puzzle)
        rows.append({"question": sudoku_question(puzzle), "puzzle": puzzle, "solution": solution})
    return rows


# ---------------------------------------------------------------------------------------------------
# Answers and rewards


def parse_grid(completion: str) -> str | None:
    """The answered digits (see the module docstring), or None when there is no answer."""
    block = last_answer_block(completion)
    if block is not None:
        return "".join(_DIGIT.findall(block))[:CELLS] or None
    runs = _GRID_RUN.findall(clean_completion(completion))
    return "".join(_DIGIT.findall(runs[-1]))[-CELLS:] if runs else None


def empty_cells_right(completion: str, puzzle: str, solution: str) -> tuple[int, int]:
    """(correctly filled empty cells, empty cells) of one completion."""
    grid = parse_grid(completion) or ""
    empty = [i for i, c in enumerate(puzzle) if c == "0"]
    return sum(i < len(grid) and grid[i] == solution[i] for i in empty), len(empty)


def sudoku_reward(
    prompts: Sequence[str], completions: Sequence[str], puzzle: Sequence[str], solution: Sequence[str], **_: Any
) -> list[float]:
    """The fraction of the originally empty cells filled correctly."""
    scores = []
    for completion, grid, truth in zip(completions, puzzle, solution):
        right, empty = empty_cells_right(completion, grid, truth)
        scores.append(right / empty)
    return scores


# ---------------------------------------------------------------------------------------------------
# Task


def _grid_field(fields: dict[str, Any], name: str, digits: str) -> str:
    value = text_field(fields, name, name.capitalize()).strip()
    if len(value) != CELLS or any(c not in digits for c in value):
        raise FieldError(name, f"must be {CELLS} characters of {digits}, got {value!r}")
    return value


class SudokuTask(Task):
    name = "sudoku"
    answer_fields = ("puzzle", "solution")

    #: compact format (option ``compact: true``): no system prompt, and the reference completion is the
    #: bare ``<answer>`` block. Small models learn and sample it in a fraction of the tokens.
    compact: bool = False

    def load(
        self, source: str | None, split: str, n: int, seed: int, blanks: int = DEFAULT_BLANKS, compact: bool = False,
        **options: Any,
    ) -> list[dict[str, Any]]:
        """Rows from ``source``, or ``n`` generated puzzles with ``blanks`` empty cells (1 to 12)."""
        reject_options(self, options)
        self.compact = bool(compact)
        check_split(split)
        if source is not None:
            return load_rows(source, split, self.to_row)
        if not 1 <= blanks <= MAX_BLANKS:
            raise ValueError(f"sudoku option blanks={blanks!r} must be between 1 and {MAX_BLANKS}.")
        return generate_sudoku(n, split, seed, blanks)

    def to_row(self, fields: dict[str, Any]) -> dict[str, Any]:
        truth = self.parse_truth(fields)
        return {"question": sudoku_question(truth["puzzle"]), **truth}

    def parse_truth(self, fields: dict[str, Any]) -> dict[str, Any]:
        puzzle = _grid_field(fields, "puzzle", "01234")
        solution = _grid_field(fields, "solution", "1234")
        if "0" not in puzzle:
            raise FieldError("puzzle", "has no empty cell (0)")
        if not is_valid_grid(solution) or any(p not in ("0", s) for p, s in zip(puzzle, solution)):
            raise FieldError("solution", f"{solution!r} is not a valid solution of puzzle {puzzle!r}")
        return {"puzzle": puzzle, "solution": solution}

    def reference_completion(self, row: dict[str, Any]) -> str | None:
        """The solution, with the filled cells listed as reasoning ("r1c3=4 ...")."""
        puzzle, solution = row["puzzle"], row["solution"]
        if self.compact:
            return f"<answer>\n{solution}\n</answer>"
        filled = [f"r{i // 4 + 1}c{i % 4 + 1}={solution[i]}" for i, c in enumerate(puzzle) if c == "0"]
        return format_completion(" ".join(filled), solution)

    def messages(self, row: dict[str, Any], for_eval: bool = False) -> list[dict[str, str]]:
        if self.compact:
            return [{"role": "user", "content": row["question"]}]
        return chat(row["question"])

    def reward_functions(self) -> list[RewardFunction]:
        return [RewardFunction("correctness", sudoku_reward, weight=1.0, correctness=True)]

    def metrics(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        return cell_metrics([empty_cells_right(c, row["puzzle"], row["solution"]) for c, row in zip(completions, rows)])

    def reference_parts(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[Parts]:
        return [reference_sudoku_cells(c, row["puzzle"], row["solution"]) for c, row in zip(completions, rows)]

    def reference_metrics(self, completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        return cell_metrics(self.reference_parts(completions, rows))


def cell_metrics(cells: Sequence[Parts]) -> dict[str, float]:
    """Cell-level ``accuracy`` over all empty cells (what d1 reports) and ``puzzle_accuracy``, in percent."""
    return {
        "accuracy": pooled_percent(cells),
        "puzzle_accuracy": 100.0 * sum(right == empty for right, empty in cells) / max(len(cells), 1),
    }
