import csv
import itertools

import pytest

from egspo.tasks import get_task
from egspo.tasks.data import DataError, builtin_data_path
from egspo.tasks.sudoku import count_solutions, generate_sudoku, parse_grid, sudoku_reward

REFERENCE = builtin_data_path("builtin:sudoku-test")  # shipped in the package
PUZZLE, SOLUTION = "3102200002100320", "3142243142131324"


def _all_grids():
    """Independent brute force: every 4x4 grid whose rows, columns and boxes hold 1-4 once."""
    perms = ["".join(p) for p in itertools.permutations("1234")]
    grids = []
    for rows in itertools.product(perms, repeat=4):
        cols_ok = all(len({row[c] for row in rows}) == 4 for c in range(4))
        boxes_ok = all(len({rows[r + i][c + j] for i in (0, 1) for j in (0, 1)}) == 4
                       for r in (0, 2) for c in (0, 2))
        if cols_ok and boxes_ok:
            grids.append("".join(rows))
    return grids


ALL_GRIDS = _all_grids()


def _brute_force_count(puzzle):
    return sum(all(p in ("0", g) for p, g in zip(puzzle, grid)) for grid in ALL_GRIDS)


def test_brute_force_reference_count():
    assert len(ALL_GRIDS) == 288


@pytest.mark.parametrize("blanks", [4, 8, 10, 12])
def test_generated_puzzles_have_unique_solutions_and_exact_blanks(blanks):
    rows = generate_sudoku(15, "test", seed=blanks, blanks=blanks)
    for row in rows:
        assert row["puzzle"].count("0") == blanks
        assert _brute_force_count(row["puzzle"]) == 1
        assert row["solution"] in ALL_GRIDS
        assert all(p in ("0", s) for p, s in zip(row["puzzle"], row["solution"]))
        assert row["question"] == f"Solve this 4x4 Sudoku (0 = empty): {row['puzzle']}"


def test_backtracking_counter_agrees_with_brute_force():
    for puzzle in ("0000000000000000", "3100200002100320", PUZZLE, "1200000000000000"):
        assert count_solutions([int(c) for c in puzzle], limit=1000) == _brute_force_count(puzzle)


def test_generator_is_deterministic_with_disjoint_splits():
    task = get_task("sudoku")
    train = task.load(None, "train", n=300, seed=0)
    assert train == task.load(None, "train", n=300, seed=0)
    test = task.load(None, "test", n=100, seed=0)
    assert not {r["puzzle"] for r in train} & {r["puzzle"] for r in test}
    assert len({r["puzzle"] for r in train}) == 300
    assert {r["puzzle"].count("0") for r in task.load(None, "test", n=5, seed=0, blanks=6)} == {6}
    with pytest.raises(ValueError, match="blanks"):
        task.load(None, "train", n=1, seed=0, blanks=13)


def test_generator_stops_when_the_split_runs_out_of_puzzles(monkeypatch):
    import egspo.tasks.sudoku as sudoku

    monkeypatch.setattr(sudoku, "_MAX_MISSES", 30)
    monkeypatch.setattr(sudoku, "split_of", lambda puzzle: "train")  # no puzzle is ever a test puzzle
    with pytest.raises(ValueError, match="Found only 0 distinct test Sudoku puzzles with 8 blanks"):
        sudoku.generate_sudoku(1, "test", seed=0)


@pytest.mark.parametrize(
    "completion, expected",
    [
        (f"<answer>\n{SOLUTION}\n</answer>", SOLUTION),
        ("<answer>\n3142\n2431\n4213\n1324\n</answer>", "3142243142131324"),  # rows on lines
        ("<answer>3 1 4 2 | 2 4 3 1, 4 2 1 3 | 1 3 2 4</answer><|eot_id|><|endoftext|>", SOLUTION),
        ("<answer>1111</answer> and then <answer>\n" + SOLUTION + "\n</answer> done", SOLUTION),  # last block
        ("<answer>3142</answer>", "3142"),  # short: compared position by position
        (f"The grid is {PUZZLE}, solved: {SOLUTION[:8]} {SOLUTION[8:]}.", SOLUTION),  # no tag: last 16-digit run
        ("no digits", None),
        ("<answer></answer> " + SOLUTION, None),  # an empty answer block is no answer
    ],
)
def test_parse_grid(completion, expected):
    assert parse_grid(completion) == expected


def test_reward_is_the_fraction_of_empty_cells_right():
    wrong_two = SOLUTION[:12] + "4" + SOLUTION[13:15] + "1"  # cells 12 and 15 (both empty) swapped
    completions = [f"<answer>{SOLUTION}</answer>", f"<answer>{wrong_two}</answer>", "<answer>3142</answer>", "none"]
    n = len(completions)
    scores = sudoku_reward([""] * n, completions, puzzle=[PUZZLE] * n, solution=[SOLUTION] * n)
    empty = PUZZLE.count("0")
    assert scores == [1.0, (empty - 2) / empty, 1 / empty, 0.0]  # "3142" fills one empty cell


def test_metrics_cell_and_puzzle_accuracy():
    task = get_task("sudoku")
    rows = [{"puzzle": PUZZLE, "solution": SOLUTION}] * 2
    metrics = task.metrics([f"<answer>{SOLUTION}</answer>", "<answer>3142</answer>"], rows)
    empty = PUZZLE.count("0")
    assert metrics == {"accuracy": pytest.approx(100 * (empty + 1) / (2 * empty)), "puzzle_accuracy": 50.0}
    # the published parser reports the same cell-level accuracy, but keeps non-digits as cells
    spaced = "<answer>" + ",".join(SOLUTION) + "</answer>"
    assert task.metrics([spaced], rows[:1])["accuracy"] == 100.0
    assert task.reference_metrics([spaced], rows[:1]) == {"accuracy": 0.0, "puzzle_accuracy": 0.0}


def test_reference_completion_is_correct_and_well_formed():
    task = get_task("sudoku")
    (row,) = task.load(None, "train", n=1, seed=0)
    completion = task.reference_completion(row)
    assert sudoku_reward([""], [completion], puzzle=[row["puzzle"]], solution=[row["solution"]]) == [1.0]
    assert completion.startswith("<reasoning>\nr") and completion.endswith(f"<answer>\n{row['solution']}\n</answer>")


def test_file_errors_name_line_and_field(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(f"Puzzle,Solution\n{PUZZLE},{SOLUTION}\n{PUZZLE},3142\n")
    with pytest.raises(DataError, match=r"s\.csv line 3: field 'solution' must be 16 characters"):
        get_task("sudoku").load(str(path), "test", n=0, seed=0)
    path.write_text(f"Puzzle,Solution\n{PUZZLE},{'4' + SOLUTION[1:]}\n")
    with pytest.raises(DataError, match="line 2: field 'solution' .* is not a valid solution"):
        get_task("sudoku").load(str(path), "test", n=0, seed=0)
    path.write_text(f"puzzle\n{PUZZLE}\n")
    with pytest.raises(DataError, match=r"line 2: field 'solution' is missing \(also accepted: Solution\)"):
        get_task("sudoku").load(str(path), "test", n=0, seed=0)


def test_reference_test_set_loads():
    rows = get_task("sudoku").load("builtin:sudoku-test", "test", n=0, seed=0)
    with REFERENCE.open() as handle:
        first = next(csv.DictReader(handle))
    assert len(rows) == 500
    assert (rows[0]["puzzle"], rows[0]["solution"]) == (first["Puzzle"], first["Solution"])
    assert all(row["puzzle"].count("0") == 8 for row in rows)
    # A quarter of the reference puzzles have several solutions (documented in docs/tasks.md): the
    # reference protocol scores only the listed one, so a valid alternative counts as wrong there.
    counts = [_brute_force_count(row["puzzle"]) for row in rows]
    assert min(counts) == 1 and sum(c == 1 for c in counts) == 376


def test_compact_option_drops_system_prompt_and_reasoning():
    from egspo.tasks import get_task

    task = get_task("sudoku")
    row = task.load(None, "train", 1, 0, compact=True)[0]
    assert task.messages(row) == [{"role": "user", "content": row["question"]}]
    completion = task.reference_completion(row)
    assert completion == f"<answer>\n{row['solution']}\n</answer>"
    columns = {k: [v] for k, v in row.items()}
    assert task.reward_functions()[0].fn(prompts=[""], completions=[completion], **columns) == [1.0]
