"""Keep third-party messages that tell an egspo user nothing off the console (``egspo -v`` shows them).

    quiet_third_party(verbose=args.verbose)   # once, in the CLI's main(), before the work starts

What is hidden, and why it is noise to a user:

- DeepSpeed's accelerator detection ("Setting accelerator to CPU. If you have GPU ..."), printed to
  *stdout* by DeepSpeed's own logger whenever something imports deepspeed on a machine without a GPU
  (``egspo new-model`` does, through transformers); it would also corrupt output that goes to a pipe.
- FutureWarning and DeprecationWarning raised inside transformers, peft, accelerate or deepspeed:
  one library calling another's deprecated API (peft reads transformers' ``is_gradient_checkpointing``
  on every LoRA model). Nobody running egspo can act on them. Deprecations that egspo's own code
  triggers are still shown (they are attributed to egspo's modules).
"""

from __future__ import annotations

import logging
import warnings

#: Libraries whose internal deprecation warnings are hidden.
QUIET_MODULES = ("transformers", "peft", "accelerate", "deepspeed")
_QUIET_MODULE_PATTERN = rf"({'|'.join(QUIET_MODULES)})(\..*)?$"
DEEPSPEED_LOGGER = "DeepSpeed"
_DEEPSPEED_NOISE = ("Setting accelerator to", "Setting ds_accelerator to")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_deepspeed_filter = _DropMessages(_DEEPSPEED_NOISE)


def quiet_third_party(verbose: bool) -> None:
    """Hide the messages listed in the module docstring, unless ``verbose``. Calling it again is harmless."""
    if verbose:
        return
    # DeepSpeed configures this logger when it is imported; a filter set on it beforehand stays in place.
    logging.getLogger(DEEPSPEED_LOGGER).addFilter(_deepspeed_filter)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_QUIET_MODULE_PATTERN)
