"""The paper's GSM8K recipe (EGSPO-SA on LLaDA-8B-Instruct) through the Python API.

    accelerate launch --config_file configs/accelerate/ddp.yaml examples/gsm8k_llada.py   # 8 GPUs, as the paper
    python examples/gsm8k_llada.py --model /models/LLaDA-8B-Instruct --per-device 8       # one GPU

Needs the weights (a hub name when online, or a local copy) and the data: `pip install 'egspo[data]'`
reads GSM8K from the hub (`openai/gsm8k`); `--train-file` takes a local jsonl with `question` and
`answer` columns instead. The settings are the paper's (docs/algorithm.md#reference-settings), the
same as configs/llada/gsm8k_egspo_sa.yaml: LoRA r 128 on every linear layer, lr 3e-5, completion 256 in
blocks of 32, T = 128, K = 8 high-entropy steps, lambda 0.5, G = 8, beta 0.04.
"""

from __future__ import annotations

import argparse
import logging

from egspo import EGSPOConfig, EGSPOTrainer
from egspo.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="GSAI-ML/LLaDA-8B-Instruct")
    parser.add_argument("--train-file", default="openai/gsm8k:main")
    parser.add_argument("--out", default="runs/llada-gsm8k-egspo-sa")
    parser.add_argument("--per-device", type=int, default=6, help="Rollouts per GPU (6 x 8 GPUs in the paper).")
    parser.add_argument("--max-steps", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = EGSPOConfig(
        output_dir=args.out, max_steps=args.max_steps, seed=42,
        task="gsm8k", train_file=args.train_file, eval_file=args.train_file, max_prompt_length=200,
        dtype="bfloat16", use_peft=True, lora_r=128, lora_alpha=64, lora_dropout=0.0,
        max_completion_length=256, block_length=32, diffusion_steps=128, temperature=0.9,
        algorithm="egspo_sa", num_generations=8, step_selection="high_entropy", num_selected_steps=8,
        stepwise_lambda=0.5, epsilon=0.2, epsilon_high=0.5, beta=0.04,
        per_device_train_batch_size=args.per_device, gradient_accumulation_steps=2,
        learning_rate=3e-5, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1, max_grad_norm=0.2,
        save_steps=200, save_total_limit=10, eval_strategy="steps", eval_steps=200, eval_limit=200,
        eval_completion_lengths=[256], report_to=["tensorboard"],
    )
    # The task's rewards, named explicitly to show the call: correctness 2.0 + four format rewards 0.5.
    # (reward_funcs=None does the same.) Any TRL-style function can join them.
    task = get_task("gsm8k")
    rewards = [f.fn for f in task.reward_functions()]
    weights = [f.weight for f in task.reward_functions()]
    config.reward_weights = weights
    trainer = EGSPOTrainer(model=args.model, reward_funcs=rewards,
                           train_dataset=task.load(args.train_file, "train", 0, 42), args=config)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
