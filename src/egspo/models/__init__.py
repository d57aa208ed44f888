"""Model architectures egspo ships, registered with the transformers Auto classes on import.

After ``import egspo`` (or ``import egspo.models``), ``AutoModel.from_pretrained(dir)`` and
``AutoModelForMaskedLM.from_pretrained(dir)`` load a local LLaDA or Dream checkpoint into the native
classes here without ``trust_remote_code``, ignoring the checkpoint's ``auto_map``. (Transformers
5.17-5.24 prefer an explicitly registered class even when ``trust_remote_code=True`` is passed, so
the published remote code is never run for these two model types once egspo is imported.)

They are deliberately not registered as ``AutoModelForCausalLM`` (the published ``auto_map`` of
LLaDA does): both models are bidirectional, and ``generate()`` of a causal LM would be wrong for them.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from egspo.models.dream import DreamConfig, DreamModel
from egspo.models.llada import LLaDAConfig, LLaDAModelLM

__all__ = ["DreamConfig", "DreamModel", "LLaDAConfig", "LLaDAModelLM"]


def _register() -> None:
    # exist_ok keeps this idempotent (module reloads, several egspo copies in one process).
    for config_class, model_class in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForMaskedLM.register(config_class, model_class, exist_ok=True)


_register()
