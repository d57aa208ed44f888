"""egspo: entropy-guided stepwise policy optimization for diffusion language models.

    from egspo import EGSPOConfig, EGSPOTrainer
    trainer = EGSPOTrainer(model="builtin:sudoku-tiny", reward_funcs=[my_reward], train_dataset=rows,
                           args=EGSPOConfig(output_dir="runs/x", max_steps=20))
    trainer.train()

Importing the package registers the native LLaDA and Dream architectures with the transformers Auto
classes, so ``AutoModel.from_pretrained(local_llada_dir)`` works without ``trust_remote_code``.
"""

import logging
from typing import Any

import egspo.models  # noqa: F401  (registers LLaDA and Dream with the transformers Auto classes)
from egspo.config import Config, EGSPOConfig, load_config
from egspo.generation import generate

__version__ = "0.2.0"
__all__ = ["Config", "EGSPOConfig", "EGSPOTrainer", "generate", "load_config", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # the trainer pulls in accelerate and peft: imported on first use, not with the package
    if name == "EGSPOTrainer":
        from egspo.rl.trainer import EGSPOTrainer

        return EGSPOTrainer
    raise AttributeError(f"module 'egspo' has no attribute {name!r}")
