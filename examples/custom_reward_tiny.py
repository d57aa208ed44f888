"""A custom reward on a custom dataset with the built-in tiny model, on a CPU in a few minutes.

    python examples/custom_reward_tiny.py [--out runs/example-custom] [--steps 20]

Each prompt asks for one digit ("Write the digit 4 many times."); the reward is the share of the
completion that is that digit. The reward function has TRL's signature: it gets the prompts, the
completions and every other dataset column (here ``digit``) as keyword arguments. The model is
``builtin:sudoku-tiny``, the 3.5M-parameter LLaDA shipped for the Sudoku demo: it writes digits 1-4 but
has never been asked for one; a few EGSPO-SA steps teach it to follow the prompt.
"""

from __future__ import annotations

import argparse
import logging
import random

import egspo
from egspo import EGSPOConfig, EGSPOTrainer


def digit_share(prompts: list[str], completions: list[str], digit: list[str], **kwargs: object) -> list[float]:
    """Share of each completion's characters that are the row's digit (0 for an empty completion)."""
    return [text.count(d) / max(len(text), 1) for text, d in zip(completions, digit, strict=True)]


def make_dataset(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digit = str(rng.randrange(1, 5))  # the digits a 4x4 Sudoku model writes
        rows.append({"prompt": f"Write the digit {digit} many times.", "digit": digit})
    return rows


def mean_reward(trainer: EGSPOTrainer, rows: list[dict[str, str]]) -> float:
    prompts = [row["prompt"] for row in rows]
    texts = egspo.generate(trainer.model, trainer.processing_class, prompts, gen_length=16, block_length=16,
                           steps=8, temperature=0.0)
    return sum(digit_share(prompts, texts, [row["digit"] for row in rows])) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/example-custom")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config = EGSPOConfig(
        output_dir=args.out, max_steps=args.steps, seed=0,
        per_device_train_batch_size=32, num_generations=8,      # 4 prompts x 8 rollouts per step
        max_completion_length=16, block_length=16, diffusion_steps=8, num_selected_steps=4,
        learning_rate=1e-3, max_grad_norm=1.0, lora_r=16, lora_alpha=32, save_steps=0,
    )
    trainer = EGSPOTrainer(model="builtin:sudoku-tiny", reward_funcs=[digit_share], train_dataset=make_dataset(512),
                           args=config)
    held_out = make_dataset(40, seed=1)
    before = mean_reward(trainer, held_out)
    trainer.train()
    after = mean_reward(trainer, held_out)
    trainer.save_model()
    logging.getLogger("example").info("greedy mean reward on 40 held-out prompts: %.3f -> %.3f", before, after)
    print(f"mean reward {before:.3f} -> {after:.3f}; model, report and curve in {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
