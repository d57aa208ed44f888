"""egspo: entropy-guided stepwise policy optimization for diffusion language models.

Importing the package registers the native LLaDA and Dream architectures with the transformers Auto
classes, so ``AutoModel.from_pretrained(local_llada_dir)`` works without ``trust_remote_code``.
"""

import logging

import egspo.models  # noqa: F401  (registers LLaDA and Dream with the transformers Auto classes)
from egspo.config import Config, load_config
from egspo.generation import generate

__version__ = "0.1.0"
__all__ = ["Config", "generate", "load_config", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
