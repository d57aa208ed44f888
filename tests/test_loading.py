import json
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from egspo.config import ConfigError, ModelConfig
from egspo.models.dream import DreamConfig, DreamModel
from egspo.models.llada import LLaDAModelLM
from egspo.models.loading import (
    ModelLoadError,
    builtin_dir,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_source,
    stop_token_ids,
)
from egspo.models.tiny import new_model, random_model
from egspo.models.tokenizer import build_char_tokenizer


def _cfg(name, **kwargs):
    return ModelConfig(name_or_path=str(name), **kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return new_model(tmp_path_factory.mktemp("models") / "tiny", seed=0, n_layers=2)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_builtin_tiny_is_deterministic_native_llada():
    dlm, tokenizer = load_model(_cfg("builtin:tiny"), dtype="float32")
    again, _ = load_model(_cfg("builtin:tiny"), dtype="float32")
    assert isinstance(dlm.model, LLaDAModelLM) and dlm.native and dlm.shift == 0
    assert all(torch.equal(a, b) for a, b in zip(dlm.model.parameters(), again.model.parameters()))
    assert dlm.mask_id == tokenizer.mask_token_id == 3
    assert dlm.stop_ids == (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    assert tokenizer.padding_side == "left"
    assert load_tokenizer(_cfg("builtin:tiny")).get_vocab() == tokenizer.get_vocab()


def test_local_dir_matches_in_memory_model_and_logits_work(tiny_dir):
    dlm, tokenizer = load_model(_cfg(tiny_dir))
    reference, _ = random_model(seed=0, n_layers=2)
    assert dlm.native and isinstance(dlm.model, LLaDAModelLM)
    assert all(torch.equal(a, b) for a, b in zip(dlm.model.parameters(), reference.parameters()))
    batch = tokenizer(["12", "1234"], padding=True, return_tensors="pt")
    full = dlm.logits(batch.input_ids, batch.attention_mask)
    part = dlm.logits(batch.input_ids, batch.attention_mask, positions=torch.tensor([2, 3]))
    torch.testing.assert_close(part, full[:, 2:4])


def test_dtype_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("bfloat16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    dlm, _ = load_model(_cfg("builtin:tiny", dtype="bfloat16"))
    assert next(dlm.model.parameters()).dtype == torch.bfloat16
    dlm, _ = load_model(_cfg("builtin:tiny"), dtype=torch.float32, device="cpu")
    assert next(dlm.model.parameters()).dtype == torch.float32


def test_native_class_even_with_auto_map_and_trust_remote_code(tiny_dir, tmp_path):
    path = _copy_dir(tiny_dir, tmp_path / "published_like")
    _edit_json(path / "config.json", auto_map={"AutoModel": "modeling_llada.LLaDAModelLM"})
    dlm, _ = load_model(_cfg(path, trust_remote_code=True))
    assert type(dlm.model) is LLaDAModelLM and dlm.native


def test_mask_token_from_config_when_tokenizer_has_none(tiny_dir, tmp_path):
    path = _copy_dir(tiny_dir, tmp_path / "no_tokenizer_mask")
    _edit_json(path / "tokenizer_config.json", mask_token=None)
    dlm, tokenizer = load_model(_cfg(path))
    assert dlm.mask_id == 3 and tokenizer.mask_token == "<|mdm_mask|>"


def test_dream_is_native_and_shifted(tmp_path):
    tokenizer = build_char_tokenizer()
    config = DreamConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    DreamModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    dlm, _ = load_model(_cfg(tmp_path))
    assert isinstance(dlm.model, DreamModel) and dlm.native and dlm.shift == 1
    assert dlm.mask_id == tokenizer.mask_token_id


def _bert_dir(path, with_mask: bool):
    tokenizer = build_char_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if not with_mask:
        _edit_json(path / "tokenizer_config.json", mask_token=None)
    return path


def test_generic_masked_lm(tmp_path):
    dlm, tokenizer = load_model(_cfg(_bert_dir(tmp_path, with_mask=True)))
    assert isinstance(dlm.model, BertForMaskedLM) and not dlm.native and dlm.shift == 0
    assert dlm.mask_id == tokenizer.mask_token_id and dlm.stop_ids[0] == tokenizer.eos_token_id


def test_error_no_mask_token(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer has no mask token; diffusion LMs need one"):
        load_model(_cfg(_bert_dir(tmp_path, with_mask=False)))


def test_error_no_weights(tiny_dir, tmp_path):
    path = _copy_dir(tiny_dir, tmp_path / "no_weights")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model weights \(\*\.safetensors / pytorch_model\.bin\) in "):
        load_model(_cfg(path))


def test_error_unknown_model_type(tiny_dir, tmp_path):
    path = _copy_dir(tiny_dir, tmp_path / "unknown")
    _edit_json(path / "config.json", model_type="mystery_dlm")
    with pytest.raises(ModelLoadError, match="unknown model_type 'mystery_dlm'.*trust_remote_code=true"):
        load_model(_cfg(path))


def test_error_not_a_masked_lm(tiny_dir, tmp_path):
    path = _copy_dir(tiny_dir, tmp_path / "causal")
    _edit_json(path / "config.json", model_type="gpt2")
    with pytest.raises(ModelLoadError, match="no masked-LM head"):
        load_model(_cfg(path))


@pytest.mark.parametrize("name", ["./missing/model", "/no/such/dir", "runs/egspo/checkpoint-200", "a..b"])
def test_error_missing_path(name):
    with pytest.raises(ModelLoadError, match="neither an existing directory nor a hub model name"):
        load_model(_cfg(name))


def test_hub_names_pass_through_unchanged():
    for name in ("GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B", "bert-base-uncased"):
        assert resolve_source(name) == name


def test_error_adapter_dir_and_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="LoRA adapter"):
        load_model(_cfg(tmp_path))
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(_cfg(tmp_path / "adapter_config.json"))


def test_builtin_sudoku_tiny_missing_is_explained():
    try:
        builtin_dir("sudoku-tiny")
    except ModelLoadError as exc:
        assert "builtin:tiny" in str(exc) and "sudoku-tiny" in str(exc)
    with pytest.raises(ModelLoadError, match="builtin:nonexistent is not available"):
        load_model(_cfg("builtin:nonexistent"))
    assert issubclass(ModelLoadError, ConfigError)  # the CLI reports it as a configuration error


def test_stop_ids_order_and_dedup():
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # LLaDA-like: the config's eos (the filler of ended completions) first, then tokenizer eos, eot, pad.
    config = SimpleNamespace(eos_token_id=5, pad_token_id=5)
    assert stop_token_ids(tokenizer, config) == (5, tokenizer.eos_token_id, eot, tokenizer.pad_token_id)
    config = SimpleNamespace(eos_token_id=[2, 7], pad_token_id=None)
    assert stop_token_ids(tokenizer, config, exclude=7) == (2, eot, tokenizer.pad_token_id)


def test_dream_remote_tokenizer_loads_as_qwen2_without_remote_code(tmp_path):
    """Published Dream checkpoints ship only a remote-code DreamTokenizer (vocab.json + merges.txt)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    n = len(vocab)
    specials = ["<|endoftext|>", "<|im_end|>", "<|mask|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "eos_token": specials[0], "pad_token": specials[0], "mask_token": specials[2],
        "added_tokens_decoder": {
            str(n + i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                         "single_word": False}
            for i, t in enumerate(specials)
        },
    }))
    config = DreamConfig(
        vocab_size=n + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, mask_token_id=n + 2, pad_token_id=n, eos_token_id=n, bos_token_id=None,
    )
    DreamModel(config).save_pretrained(tmp_path)
    dlm, tokenizer = load_model(_cfg(tmp_path))
    assert dlm.shift == 1 and dlm.mask_id == n + 2 and dlm.stop_ids == (n, n + 1)
    text = "Hello world 12<|im_end|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_builtin_data_directory_is_not_a_model():
    with pytest.raises(ModelLoadError, match="builtin:data is not available") as info:
        load_model(_cfg("builtin:data"))
    assert "builtin:sudoku-tiny" in str(info.value) and "builtin:data," not in str(info.value)


# -- hub names that are not on disk ----------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch):
    """Stand-ins for the hub (config download) and the network probe; records what was asked of them."""
    from egspo.models import hub, loading

    calls = {"config": [], "probe": []}

    def get_config_dict(name, *args, **kwargs):
        calls["config"].append(name)
        raise OSError("stub hub: no such model")

    def probe(host, port):
        calls["probe"].append((host, port))
        return calls.get("problem")

    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading.PretrainedConfig, "get_config_dict", get_config_dict)
    monkeypatch.setattr(hub, "_connection_problem", probe)
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo_id, filename: None)
    return calls


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_variable_fails_at_once_with_a_sentence(hub_calls, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ModelLoadError, match=rf"'someone/model' is neither a local directory nor in the Hugging "
                                             rf"Face cache, and the hub is offline \({variable}=1 is set; unset it"):
        load_model(_cfg("someone/model"))
    assert hub_calls == {"config": [], "probe": []}  # neither the hub nor the network was tried


def test_unreachable_hub_fails_at_once_with_a_sentence(hub_calls):
    hub_calls["problem"] = "[Errno 101] Network is unreachable"
    with pytest.raises(ModelLoadError, match=r"hub is offline \(huggingface\.co:443 cannot be reached: \[Errno 101\] "
                                             r"Network is unreachable.*give the path of a downloaded model"):
        load_tokenizer(_cfg("someone/model"))
    assert hub_calls["config"] == [] and hub_calls["probe"] == [("huggingface.co", 443)]


def test_reachable_or_cached_hub_names_take_the_hub_path(hub_calls, monkeypatch):
    from egspo.models import hub

    with pytest.raises(ModelLoadError, match="could not read the config of 'someone/model'.*stub hub"):
        load_model(_cfg("someone/model"))  # online: from_pretrained's path, as before
    assert hub_calls["config"] == ["someone/model"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo_id, filename: f"/cache/{repo_id}/{filename}")
    with pytest.raises(ModelLoadError, match="stub hub"):
        load_model(_cfg("someone/cached"))  # offline but cached: transformers reads the cache
    assert hub_calls["config"] == ["someone/model", "someone/cached"]


def test_probe_connects_to_the_endpoint_or_its_proxy(monkeypatch):
    import socket

    from egspo.models import hub

    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY",
                     "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    assert hub.probe_address("https://huggingface.co") == ("huggingface.co", 443)
    assert hub.probe_address("http://mirror.local:8080") == ("mirror.local", 8080)
    monkeypatch.setenv("https_proxy", "http://proxy.local:3128")
    assert hub.probe_address("https://huggingface.co") == ("proxy.local", 3128)
    with socket.socket() as server:  # a port that listens, then one that does not
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub._connection_problem("127.0.0.1", port) is None
    assert hub._connection_problem.__wrapped__("127.0.0.1", port) is not None
