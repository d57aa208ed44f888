"""Reward functions imported by path ("tests.reward_fns:...") in trainer tests."""


def count_sevens(prompts, completions, **columns):
    """Share of an 8-token completion that is the character 7: trivially learnable by a tiny model."""
    return [min(1.0, sum(c == "7" for c in text) / 8) for text in completions]


def broken(prompts, completions, **columns):
    raise ZeroDivisionError("deliberately broken reward")


def sometimes_none(prompts, completions, **columns):
    return [None if i == 0 else 1.0 for i in range(len(completions))]
