import pytest

from egspo.tasks import SYSTEM_PROMPT, TASK_NAMES, Task, format_prompt, get_task


def test_every_registered_task_loads_and_declares_its_rewards():
    assert {"gsm8k", "math500", "countdown", "sudoku"} <= set(TASK_NAMES)
    for name in TASK_NAMES:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        functions = task.reward_functions()
        assert len({f.name for f in functions}) == len(functions)
        if name in ("gsm8k", "math500", "countdown", "sudoku"):
            assert [f.name for f in functions if f.correctness] == ["correctness"]


@pytest.mark.parametrize("name", ["gsm8k", "math500", "countdown", "sudoku", "mbpp"])
def test_a_task_option_the_task_does_not_take_is_a_type_error(name):
    # loaders turn TypeError into a config error naming the task; the option must not be dropped silently
    with pytest.raises(TypeError, match="unexpected keyword argument.*'no_such_option'"):
        get_task(name).load(None, "test", 2, 0, no_such_option=1)


def test_unknown_task():
    with pytest.raises(ValueError, match="Unknown task 'chess'; built-in tasks: gsm8k"):
        get_task("chess")


class _PlainTokenizer:
    chat_template = None


class _ChatTokenizer:
    chat_template = "template"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"


def test_format_prompt_with_and_without_chat_template():
    messages = get_task("sudoku").messages({"question": "Solve this 4x4 Sudoku (0 = empty): 3102200002100320"})
    assert format_prompt(_PlainTokenizer(), messages) == (
        f"{SYSTEM_PROMPT}\n\nSolve this 4x4 Sudoku (0 = empty): 3102200002100320\n")
    assert format_prompt(_ChatTokenizer(), messages).endswith("3102200002100320\n<|assistant|>")


def test_format_prompt_with_a_real_transformers_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert format_prompt(tokenizer, messages) == "S\n\nU\n"
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert format_prompt(tokenizer, messages) == "[system]S[user]U[assistant]"
