"""Load a diffusion LM and its tokenizer from ``model_name_or_path``.

    dlm, tokenizer = load_model(cfg.model_config())         # on CPU, dtype per cfg.dtype
    dlm, tokenizer = load_model(cfg.model_config(), device="cuda")

``name_or_path`` is one of
- ``builtin:tiny`` / ``builtin:small``: a random-init LLaDA-architecture preset with the character
  tokenizer, built in memory (seed 0, so every process and every run gets the same weights);
- ``builtin:NAME``: a model directory shipped in the package (``egspo/assets/NAME``, e.g. sudoku-tiny);
- a local model directory or a Hugging Face hub name; both go through ``from_pretrained``. A hub name
  that is neither cached nor reachable (offline variables set, or no connection: ``egspo.models.hub``)
  fails at once with a :class:`ModelLoadError`.

Checkpoints whose ``model_type`` is ``llada`` or ``Dream`` load egspo's own implementations (registered
with the transformers Auto classes), never their remote code: those are weight-compatible and add
``logits_positions=``. Everything else loads with ``AutoModelForMaskedLM`` (BERT, ModernBERT, ...), or with
the checkpoint's own code when ``trust_remote_code`` is set. Tokenizers pad on the left, as batched
generation needs.

``load_in_4bit`` / ``load_in_8bit`` (egspo[qlora]) pass a transformers ``BitsAndBytesConfig`` to
``from_pretrained``, which quantises the block linears as they are loaded onto the GPU (the LM head,
embedding and norms stay in ``dtype``). :func:`check_quantization` refuses what cannot work before any weight
is read: both at once, full fine-tuning of quantised weights, no CUDA device, bitsandbytes missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from egspo.config import ConfigError, ModelConfig
from egspo.models import hub
from egspo.models.adapter import DiffusionLM, unwrap
from egspo.models.tiny import PRESETS, preset_config, random_model
from egspo.models.tokenizer import build_char_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
NATIVE_MODEL_TYPES = ("llada", "Dream")
#: Architectures whose output at position i predicts token i + 1.
SHIFTED_MODEL_TYPES = ("Dream",)
#: End-of-turn tokens of instruct chat templates (LLaDA/Llama-3, Dream/Qwen): a completion ends there too.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")
#: Native architectures whose published tokenizer exists only as remote code, and the transformers
#: tokenizer that code copies (Dream's DreamTokenizer is Qwen2's byte-level BPE).
_NATIVE_TOKENIZER_TYPES = {"Dream": "qwen2"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_NAME = re.compile(rf"{_HUB_PART}(?:/{_HUB_PART})?")


#: The bitsandbytes release egspo[qlora] asks for (4-bit training through torch custom ops).
MIN_BITSANDBYTES = "0.45"
QLORA_INSTALL = "pip install 'egspo[qlora]'"


class ModelLoadError(ConfigError):
    """``model_name_or_path`` does not lead to a usable diffusion LM; the message says why."""


# -- public API ---------------------------------------------------------------------------------


def load_model(
    cfg: ModelConfig,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[DiffusionLM, PreTrainedTokenizerBase]:
    """The model of ``cfg`` wrapped as a :class:`DiffusionLM`, and its tokenizer (left padding).

    ``dtype`` overrides ``cfg.dtype``; "auto" means bf16 when the model goes to CUDA (``device`` is a CUDA
    device, or None with CUDA available, as accelerate will move it there) and fp32 otherwise. ``device``
    None leaves the model on the CPU for the trainer to place.
    """
    check_quantization(cfg, device)
    quantization = quantization_config(cfg)
    torch_dtype = resolve_dtype(cfg.dtype if dtype is None else dtype, device)
    preset = _random_preset(cfg.name_or_path)
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    if preset is not None:
        model, tokenizer = random_model(preset, seed=0)
        cast(nn.Module, model).to(dtype=torch_dtype)  # transformers' @wraps on PreTrainedModel.to hides its self
        config = model.config.to_dict()
    else:
        source = resolve_source(cfg.name_or_path)
        config = _read_config(source)
        trust = _trust_remote_code(config, cfg, source)
        tokenizer = _load_tokenizer(source, config, trust)
        model_class = _model_class(config, trust, source)
        kwargs: dict[str, Any] = {}
        if quantization is not None:  # quantised while loading onto the GPU; such a model is never moved
            kwargs = {"quantization_config": quantization, "device_map": {"": _cuda_device(device)}}
        model = _from_pretrained(model_class, source, dtype=torch_dtype, trust_remote_code=trust, **kwargs)
    _fix_tokenizer(tokenizer, config)
    if device is not None and quantization is None:
        model.to(device)
    dlm = as_diffusion_lm(model, tokenizer)
    logger.info(
        "Loaded %s (%s, %s, %.1fM parameters%s): mask %d, stop %s%s",
        cfg.name_or_path, type(unwrap(model)).__name__, torch_dtype, parameter_count(model) / 1e6,
        "" if quantization is None else f", {describe_quantization(cfg)}, weights {_weights_gb(model):.2f} GB",
        dlm.mask_id, dlm.stop_ids, ", shifted logits" if dlm.shift else "",
    )
    return dlm, tokenizer


def quantization_config(cfg: ModelConfig) -> Any:
    """The transformers ``BitsAndBytesConfig`` of ``cfg`` (None without load_in_4bit / load_in_8bit)."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=_DTYPES[cfg.bnb_4bit_compute_dtype],
    )


def describe_quantization(cfg: ModelConfig) -> str:
    """How ``cfg`` quantises the base, in words (for logs and messages); "" when it does not."""
    if cfg.load_in_8bit:
        return "8-bit LLM.int8 base"
    if cfg.load_in_4bit:
        double = ", double quantisation" if cfg.bnb_4bit_use_double_quant else ""
        return f"4-bit {cfg.bnb_4bit_quant_type} base ({cfg.bnb_4bit_compute_dtype} compute{double})"
    return ""


def check_quantization(cfg: ModelConfig, device: str | torch.device | None = None) -> None:
    """Refuse a quantised load that cannot work, before any weight is read (one sentence each)."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit are both true: choose one (4-bit NF4 for QLoRA, or 8-bit).")
    field = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
    if not cfg.lora:
        raise ConfigError(
            f"{field}=true with use_peft=false: quantised weights cannot be trained (they have no gradients), so "
            "full fine-tuning is impossible; set use_peft=true to train a LoRA adapter on the quantised base, or "
            f"{field}=false for full fine-tuning.")
    if _random_preset(cfg.name_or_path) is not None:
        raise ConfigError(
            f"{field}=true quantises weights while from_pretrained loads them, but {cfg.name_or_path} is built in "
            f"memory: write it to disk first (egspo new-model --preset {cfg.name_or_path[len(BUILTIN_PREFIX):]} "
            "--out DIR) and load that directory.")
    where = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (where is not None and where.type != "cuda"):
        on = "no CUDA device is available" if not torch.cuda.is_available() else f"the model is placed on {where}"
        raise ConfigError(
            f"{field}=true needs a CUDA GPU (egspo runs bitsandbytes' quantised layers on CUDA only) and {on}: "
            f"set {field}=false to train in {cfg.dtype if cfg.dtype != 'auto' else 'float32'} on this machine.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{field}=true needs bitsandbytes, which is not installed: {QLORA_INSTALL}.")
    from packaging.version import Version

    installed = importlib.metadata.version("bitsandbytes")
    if Version(installed) < Version(MIN_BITSANDBYTES):
        raise ConfigError(f"{field}=true needs bitsandbytes >= {MIN_BITSANDBYTES}, found {installed}: {QLORA_INSTALL}.")


def quantized_bits(model: nn.Module) -> int | None:
    """4 or 8 for a model loaded quantised by bitsandbytes, else None."""
    core = unwrap(model)
    if getattr(core, "is_loaded_in_4bit", False):
        return 4
    if getattr(core, "is_loaded_in_8bit", False):
        return 8
    return None


def parameter_count(model: nn.Module) -> int:
    """Parameters as the unquantised model has them: a packed 4-bit weight counts its original shape, a
    DeepSpeed ZeRO-3 partitioned one its ``ds_numel`` (its ``data`` is empty after a partitioned load)."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += state.shape.numel() if state is not None else getattr(param, "ds_numel", param.numel())
    return total


def read_model_config(name_or_path: str) -> dict[str, Any]:
    """The ``config.json`` of a model as a dict, without reading its weights (a built-in random preset's
    config as :func:`load_model` would build it)."""
    preset = _random_preset(name_or_path)
    if preset is not None:
        tokenizer = build_char_tokenizer()
        return preset_config(preset, len(tokenizer), tokenizer.mask_token_id, tokenizer.eos_token_id,
                             tokenizer.pad_token_id).to_dict()
    return _read_config(resolve_source(name_or_path))


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Only the tokenizer of ``cfg``'s model, prepared as :func:`load_model` prepares it."""
    preset = _random_preset(cfg.name_or_path)
    if preset is not None:
        return build_char_tokenizer()
    source = resolve_source(cfg.name_or_path)
    config = _read_config(source)
    tokenizer = _load_tokenizer(source, config, _trust_remote_code(config, cfg, source))
    _fix_tokenizer(tokenizer, config)
    return tokenizer


def as_diffusion_lm(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> DiffusionLM:
    """Wrap a loaded model: mask and stop tokens, Dream's logit shift, native fast paths.

    Without ``tokenizer`` the mask and stop tokens come from the model config alone."""
    core = unwrap(model)
    config = core.config
    model_type = getattr(config, "model_type", None)
    mask_id = tokenizer.mask_token_id if tokenizer is not None else None
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise ModelLoadError(
            f"The tokenizer has no mask token; diffusion LMs need one ({type(core).__name__} has none in its "
            "tokenizer or config). Set mask_token in tokenizer_config.json or mask_token_id in config.json."
        )
    num_embeddings = cast("PreTrainedModel", core).get_input_embeddings().num_embeddings
    if not 0 <= mask_id < num_embeddings:
        raise ModelLoadError(f"mask token id {mask_id} is outside the model's {num_embeddings} embeddings.")
    return DiffusionLM(
        model=model,
        mask_id=int(mask_id),
        stop_ids=stop_token_ids(tokenizer, config, exclude=int(mask_id)),
        shift=1 if model_type in SHIFTED_MODEL_TYPES else 0,
        native=type(core).__module__.startswith("egspo."),
    )


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase | None, config: Any, exclude: int | None = None
) -> tuple[int, ...]:
    """End tokens, the filler of ended completions first: eos (config's, then tokenizer's), end-of-turn, pad.

    The config's eos comes first because it names the token the checkpoint was trained to fill ended
    sequences with (LLaDA: ``<|endoftext|>`` 126081), which the tokenizer's eos need not be. Without
    ``tokenizer``, only the config's eos and pad.
    """
    candidates: list[Any] = [*_as_list(getattr(config, "eos_token_id", None))]
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        candidates += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    candidates.append(getattr(config, "pad_token_id", None))
    if tokenizer is not None:
        candidates.append(tokenizer.pad_token_id)
    ids = tuple(dict.fromkeys(int(i) for i in candidates if i is not None and i != exclude))
    if not ids:
        raise ModelLoadError(
            "Neither the tokenizer nor the model config names an end-of-sequence or padding token; "
            "set eos_token in tokenizer_config.json or eos_token_id in config.json."
        )
    return ids


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """A torch dtype from a config string; "auto" is bf16 on CUDA and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def resolve_source(name_or_path: str) -> str:
    """What ``from_pretrained`` gets: a checked local directory or a hub name (``builtin:`` resolved)."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        path = builtin_dir(name_or_path[len(BUILTIN_PREFIX):])
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            if _HUB_NAME.fullmatch(name_or_path) and ".." not in name_or_path and "--" not in name_or_path:
                return name_or_path
            raise ModelLoadError(
                f"model_name_or_path={name_or_path!r} is neither an existing directory nor a hub model name "
                "(owner/name)."
            )
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file; model_name_or_path must be the model's directory.")
    _check_model_dir(path)
    return str(path)


def builtin_dir(name: str) -> Path:
    """The directory of a model shipped in the package (``egspo/assets/NAME``)."""
    path = Path(str(resources.files("egspo") / "assets" / name))
    if (path / "config.json").is_file():
        return path
    # assets/ also holds data (assets/data): only directories with a config.json are models
    shipped = sorted(p.parent.name for p in path.parent.glob("*/config.json")) if path.parent.is_dir() else []
    raise ModelLoadError(
        f"builtin:{name} is not available in this installation (expected the directory {path}). Built-in "
        f"models: {', '.join(f'builtin:{n}' for n in [*PRESETS, *shipped])} ('builtin:tiny' is a random-init "
        "model that always works); or give a local directory or hub name."
    )


# -- internals ----------------------------------------------------------------------------------


def _random_preset(name_or_path: str) -> str | None:
    name = name_or_path[len(BUILTIN_PREFIX):] if name_or_path.startswith(BUILTIN_PREFIX) else None
    return name if name in PRESETS else None


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"{path} holds a LoRA adapter, not a model: load the base model named in its "
                "adapter_config.json and apply the adapter on top (egspo eval --adapter)."
            )
        raise ModelLoadError(f"no config.json in {path}: not a transformers model directory.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"no model weights (*.safetensors / pytorch_model.bin) in {path}.")


def _read_config(source: str) -> dict[str, Any]:
    local = Path(source) / "config.json"
    if not local.is_file():
        _check_hub_usable(source)
    try:
        if local.is_file():
            config = json.loads(local.read_text())
        else:
            config, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, json.JSONDecodeError) as exc:
        where = "" if local.is_file() else " (no such local directory, so it was looked up on the Hugging Face hub)"
        raise ModelLoadError(f"could not read the config of {source!r}{where}: {exc}") from exc
    if not config.get("model_type"):
        raise ModelLoadError(f"the config of {source!r} has no model_type: cannot tell which architecture to load.")
    return config


def _check_hub_usable(name: str) -> None:
    """Fail at once, not after the hub client's retries, when a model that is not on disk cannot be fetched."""
    if hub.is_cached(name):
        return  # from_pretrained finds it in the hub cache
    reason = hub.offline_reason()
    if reason is not None:
        raise ModelLoadError(
            f"model.name_or_path={name!r} is neither a local directory nor in the Hugging Face cache, and the hub "
            f"is offline ({reason}): give the path of a downloaded model directory, or go online to download it."
        )


def _trust_remote_code(config: dict[str, Any], cfg: ModelConfig, source: str) -> bool:
    """Whether to run the checkpoint's own code; never for native architectures, required for unknown ones."""
    model_type = config["model_type"]
    if model_type in NATIVE_MODEL_TYPES:
        if cfg.trust_remote_code:
            logger.info("Ignoring trust_remote_code for %s: egspo ships the %s architecture.", source, model_type)
        return False
    if model_type in CONFIG_MAPPING:
        return cfg.trust_remote_code
    if cfg.trust_remote_code and "auto_map" in config:
        return True
    raise ModelLoadError(
        f"unknown model_type {model_type!r} in the config of {source!r}: egspo ships "
        f"{' and '.join(NATIVE_MODEL_TYPES)}, and transformers' masked LMs (bert, modernbert, ...) load "
        "directly; a checkpoint with its own modeling code (auto_map) needs trust_remote_code=true."
    )


def _model_class(config: dict[str, Any], trust: bool, source: str) -> type[Any]:
    auto_map = config.get("auto_map", {}) if trust else {}
    if auto_map and "AutoModelForMaskedLM" not in auto_map and "AutoModel" in auto_map:
        return AutoModel  # remote diffusion LMs often register only AutoModel (LLaDA and Dream do)
    if not auto_map and CONFIG_MAPPING[config["model_type"]] not in MODEL_FOR_MASKED_LM_MAPPING:
        raise ModelLoadError(
            f"{source!r} is a {config['model_type']!r} model, which has no masked-LM head in transformers: "
            "egspo trains masked diffusion LMs (LLaDA, Dream, or any AutoModelForMaskedLM)."
        )
    return AutoModelForMaskedLM


def _cuda_device(device: str | torch.device | None) -> torch.device:
    """The CUDA device a quantised model loads onto: ``device``, or the current one."""
    where = torch.device(device) if device is not None else torch.device("cuda")
    return where if where.index is not None else torch.device("cuda", torch.cuda.current_device())


def _weights_gb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def _from_pretrained(auto_class: type[Any], source: str, **kwargs: Any) -> nn.Module:
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load the model {source!r}: {exc}") from exc


def _load_tokenizer(source: str, config: dict[str, Any], trust: bool) -> PreTrainedTokenizerBase:
    kwargs: dict[str, Any] = {"trust_remote_code": trust}
    tokenizer_type = _NATIVE_TOKENIZER_TYPES.get(config["model_type"])
    if tokenizer_type is not None and _tokenizer_needs_remote_code(source):
        kwargs["tokenizer_type"] = tokenizer_type
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load the tokenizer of {source!r}: {exc}") from exc


def _tokenizer_needs_remote_code(source: str) -> bool:
    local = Path(source) / "tokenizer_config.json"
    if local.is_file():
        return "auto_map" in json.loads(local.read_text())
    return True  # hub checkpoints of native types are the published ones, which ship a remote tokenizer


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase, config: dict[str, Any]) -> None:
    """Left padding, and mask/pad tokens named only in the model config (LLaDA's tokenizer has no mask token)."""
    tokenizer.padding_side = "left"
    if tokenizer.mask_token is None and config.get("mask_token_id") is not None:
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(int(config["mask_token_id"]))
    if tokenizer.pad_token is None:
        pad_id = config.get("pad_token_id")
        pad = tokenizer.convert_ids_to_tokens(int(pad_id)) if pad_id is not None else tokenizer.eos_token
        tokenizer.pad_token = pad
        logger.info("The tokenizer has no pad token; padding with %r.", tokenizer.pad_token)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
