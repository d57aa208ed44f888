"""Generation: egspo.generate, diffusion_generate on the native models, generation_config.json, `egspo generate`.

The shipped ``builtin:sudoku-tiny`` (24 tokens in 12 steps by its generation_config) and a shrunk random LLaDA
with a wide init (so that sampled completions vary) keep every call to milliseconds on a CPU.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, GenerationConfig

import egspo
from egspo.cli import main
from egspo.config import ConfigError, ModelConfig, SamplerConfig
from egspo.generation import denoising_frames, resolve_sampler
from egspo.models.dream import DreamConfig, DreamModel
from egspo.models.loading import builtin_dir, load_model
from egspo.models.lora import apply_lora
from egspo.models.tiny import new_model
from egspo.rl.batching import encode_prompts
from egspo.sampling import sample
from egspo.tasks import format_prompt

SMALL = {"n_layers": 2, "d_model": 64, "n_heads": 2, "mlp_hidden_size": 128, "init_std": 0.3}
PUZZLE = "Solve this 4x4 Sudoku (0 = empty): 0000420003242430"
OTHER = "Solve this 4x4 Sudoku (0 = empty): 1000020000300004"
FAST = {"gen_length": 16, "block_length": 8, "steps": 8}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sudoku():
    return load_model(ModelConfig(name_or_path="builtin:sudoku-tiny"))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_model(tmp_path_factory.mktemp("models") / "small", **SMALL)


@pytest.fixture(scope="module")
def small(small_dir: Path):
    return AutoModel.from_pretrained(small_dir), AutoTokenizer.from_pretrained(small_dir, padding_side="left")


# -- egspo.generate ---------------------------------------------------------------------------------


def test_generate_text_list_and_chat(sudoku) -> None:
    dlm, tokenizer = sudoku
    messages = [{"role": "user", "content": PUZZLE}]
    templated = format_prompt(tokenizer, messages)

    one = egspo.generate(dlm, tokenizer, templated)
    assert isinstance(one, str) and "<answer>" in one
    both = egspo.generate(dlm, tokenizer, [templated, format_prompt(tokenizer, [{"role": "user", "content": OTHER}])])
    assert isinstance(both, list) and len(both) == 2 and both[0] == one and both[1] != one
    # a conversation (alone: a str back; in a list: a list back), and a text wrapped by chat_template=True
    assert egspo.generate(dlm, tokenizer, messages) == one
    assert egspo.generate(dlm, tokenizer, [messages]) == [one]
    assert egspo.generate(dlm, tokenizer, PUZZLE, chat_template=True) == one
    # without chat_template=True a text is used as it is
    raw = egspo.generate(dlm, tokenizer, PUZZLE, return_trajectory=True)[1]
    assert raw.prompt_length == len(tokenizer(PUZZLE, add_special_tokens=False)["input_ids"])


def test_generate_is_the_trainers_sampler(small) -> None:
    model, tokenizer = small
    prompts = ["abc", "a longer prompt"]
    settings = {"gen_length": 16, "block_length": 8, "steps": 8, "temperature": 0.9}
    texts, traj = egspo.generate(model, tokenizer, prompts, seed=3, return_trajectory=True, **settings)

    width = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    ids, mask = encode_prompts(tokenizer, prompts, width, torch.device("cpu"))
    dlm = egspo.generation.diffusion_lm(model, tokenizer)
    direct = sample(dlm, ids, SamplerConfig(**settings), attention_mask=mask,
                    generator=torch.Generator().manual_seed(3), record_greedy=False)
    assert torch.equal(traj.sequences, direct.sequences)
    assert torch.equal(traj.step_of_position, direct.step_of_position)
    assert torch.allclose(traj.step_logps, direct.step_logps)
    assert texts == tokenizer.batch_decode(direct.completions, skip_special_tokens=True)
    assert traj.greedy is None and traj.num_steps == 8 and traj.completion_length == 16

    # the seed matters at temperature > 0 and repeats exactly
    assert egspo.generate(model, tokenizer, prompts, seed=3, **settings) == texts
    other = egspo.generate(model, tokenizer, prompts, seed=4, return_trajectory=True, **settings)[1]
    assert not torch.equal(other.sequences, traj.sequences)


def test_batches_join_into_one_trajectory(small) -> None:
    model, tokenizer = small
    prompts = ["abc", "a longer prompt", "xy"]
    texts, traj = egspo.generate(model, tokenizer, prompts, return_trajectory=True, **FAST)
    split, split_traj = egspo.generate(model, tokenizer, prompts, batch_size=2, return_trajectory=True, **FAST)
    assert split == texts
    assert split_traj.batch_size == 3 and split_traj.prompt_length == traj.prompt_length
    assert torch.equal(split_traj.sequences, traj.sequences)
    assert torch.equal(split_traj.step_of_position, traj.step_of_position)


def test_defaults_come_from_the_generation_config(sudoku, small) -> None:
    dlm, tokenizer = sudoku
    traj = egspo.generate(dlm, tokenizer, PUZZLE, return_trajectory=True)[1]
    assert (traj.completion_length, traj.num_steps) == (24, 12)  # the shipped generation_config.json
    # a longer completion keeps the stored block length and steps-per-token ratio
    assert resolve_sampler(dlm.core, gen_length=48) == SamplerConfig(
        gen_length=48, block_length=24, steps=24, temperature=0.0)

    model, _ = small
    assert resolve_sampler(model) == SamplerConfig(gen_length=128, block_length=32, steps=64, temperature=0.0)
    bare = copy.deepcopy(model)
    bare.generation_config = GenerationConfig(max_new_tokens=16)  # no egspo fields: egspo's defaults
    assert resolve_sampler(bare) == SamplerConfig(gen_length=128, block_length=32, steps=64, temperature=0.0)
    assert resolve_sampler(bare, gen_length=24) == SamplerConfig(gen_length=24, block_length=24, steps=12,
                                                                 temperature=0.0)
    bare.set_diffusion_defaults(gen_length=16, block_length=8, steps=4, temperature=0.5, remasking="random")
    assert resolve_sampler(bare) == SamplerConfig(gen_length=16, block_length=8, steps=4, temperature=0.5,
                                                  remasking="random")
    assert resolve_sampler(bare, temperature=0.0, steps=8).temperature == 0.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gen_length": 30, "block_length": 8}, "gen_length=30 is not a multiple of block_length=8"),
        ({"gen_length": 48}, "Not given, so defaulted (from the model's generation_config): block_length=32"),
        ({"gen_length": 16, "block_length": 8, "steps": 3}, "steps=3 is not a multiple of the number of blocks"),
        ({"gen_length": 8, "steps": 16}, "steps=16 exceeds gen_length=8"),
        ({"remasking": "best"}, "remasking='best' is not one of"),
        ({"gen_length": "16"}, "gen_length='16' must be an integer"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
    ],
)
def test_bad_settings_are_named(small, options, message) -> None:
    model, tokenizer = small
    with pytest.raises(ConfigError, match=re.escape(message)):
        egspo.generate(model, tokenizer, "abc", **options)


def test_bad_prompts_are_named(small) -> None:
    model, tokenizer = small
    with pytest.raises(ValueError, match="non-empty list"):
        egspo.generate(model, tokenizer, [], **FAST)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a str"):
        egspo.generate(model, tokenizer, ["abc", 7], **FAST)
    with pytest.raises(ValueError, match="chat_template=False"):
        egspo.generate(model, tokenizer, [[{"role": "user", "content": "hi"}]], chat_template=False, **FAST)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        egspo.generate(model, plain, "abc", chat_template=True, **FAST)
    with pytest.raises(TypeError, match="DiffusionLM or a torch model"):
        egspo.generate("builtin:tiny", tokenizer, "abc")


# -- native models: diffusion_generate, generate, generation_config.json -----------------------------


def test_diffusion_generate_is_generate(small) -> None:
    model, tokenizer = small
    prompts = ["abc", "a longer prompt"]
    texts = egspo.generate(model, tokenizer, prompts, temperature=0.7, seed=1, **FAST)
    assert model.diffusion_generate(prompts=prompts, tokenizer=tokenizer, temperature=0.7, seed=1, **FAST) == texts

    batch = tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    # no tokenizer: the mask and end tokens come from the config
    ids = model.diffusion_generate(batch["input_ids"], batch["attention_mask"], temperature=0.7, seed=1, **FAST)
    width = batch["input_ids"].shape[1]
    assert ids.shape == (2, width + 16) and torch.equal(ids[:, :width], batch["input_ids"])
    assert tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True) == texts
    same = model.diffusion_generate(batch["input_ids"], batch["attention_mask"], tokenizer=tokenizer,
                                    temperature=0.7, seed=1, **FAST)
    assert torch.equal(same, ids)

    with pytest.raises(ValueError, match="pad prompts on the left"):
        model.diffusion_generate(batch["input_ids"], batch["attention_mask"].flip(1), **FAST)
    with pytest.raises(TypeError, match="not both"):
        model.diffusion_generate(batch["input_ids"], prompts=prompts, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="Unknown generation option.*chat_template"):
        model.diffusion_generate(batch["input_ids"], chat_template=True, **FAST)
    with pytest.raises(TypeError, match="needs tokenizer"):
        model.diffusion_generate(prompts=prompts)
    with pytest.raises(NotImplementedError, match="diffusion_generate"):
        model.generate(batch["input_ids"], max_new_tokens=16)


def test_peft_wrapped_model_generates_with_its_adapter(small_dir: Path) -> None:
    model = AutoModel.from_pretrained(small_dir)
    tokenizer = AutoTokenizer.from_pretrained(small_dir)
    base = egspo.generate(model, tokenizer, ["abc", "xyz"], **FAST)
    peft_model = apply_lora(model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: make the adapter change the model
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    adapted = egspo.generate(peft_model, tokenizer, ["abc", "xyz"], **FAST)
    assert adapted != base
    assert peft_model.diffusion_generate(prompts=["abc", "xyz"], tokenizer=tokenizer, **FAST) == adapted


def test_dream_generates_with_its_shift(tmp_path: Path) -> None:
    config = DreamConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         mask_token_id=99, eos_token_id=98, pad_token_id=98, bos_token_id=98)
    torch.manual_seed(0)
    model = DreamModel(config).eval()
    model.set_diffusion_defaults(gen_length=8, block_length=4, steps=4)
    prompt = torch.randint(0, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    ids = model.diffusion_generate(prompt)
    assert ids.shape == (2, 13) and torch.equal(ids[:, :5], prompt) and not (ids == 99).any()
    with pytest.raises(NotImplementedError, match="DreamModel is a masked diffusion LM"):
        model.generate(prompt)

    model.save_pretrained(tmp_path / "dream")
    loaded = AutoModel.from_pretrained(tmp_path / "dream")
    assert isinstance(loaded, DreamModel)
    assert torch.equal(loaded.diffusion_generate(prompt), ids)


def test_generation_config_round_trip(small_dir: Path, tmp_path: Path) -> None:
    written = json.loads((small_dir / "generation_config.json").read_text())
    assert {k: written.get(k) for k in ("max_new_tokens", "block_length", "steps", "remasking", "do_sample",
                                        "mask_token_id")} == {
        "max_new_tokens": 128, "block_length": 32, "steps": 64, "remasking": "low_confidence", "do_sample": False,
        "mask_token_id": 3}

    model = AutoModel.from_pretrained(small_dir)
    model.set_diffusion_defaults(gen_length=16, block_length=8, steps=4, temperature=0.7, remasking="random")
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert saved["do_sample"] is True and saved["temperature"] == 0.7  # transformers' way of saying "sample"
    loaded = AutoModel.from_pretrained(tmp_path / "m")
    assert resolve_sampler(loaded) == SamplerConfig(gen_length=16, block_length=8, steps=4, temperature=0.7,
                                                    remasking="random")

    # a checkpoint without the file falls back to egspo's defaults
    (tmp_path / "m" / "generation_config.json").unlink()
    assert resolve_sampler(AutoModel.from_pretrained(tmp_path / "m")).gen_length == 128

    with pytest.raises(ConfigError, match="not a multiple"):
        model.set_diffusion_defaults(gen_length=10, block_length=4, steps=2)

    shipped = json.loads((builtin_dir("sudoku-tiny") / "generation_config.json").read_text())
    assert (shipped["max_new_tokens"], shipped["block_length"], shipped["steps"], shipped["do_sample"]) == \
        (24, 24, 12, False)


# -- frames -------------------------------------------------------------------------------------------


def test_denoising_frames_fill_in(small) -> None:
    model, tokenizer = small
    texts, traj = egspo.generate(model, tokenizer, ["abc", "xyz"], return_trajectory=True, **FAST)
    frames = denoising_frames(tokenizer, traj, placeholder="¤")
    assert len(frames) == traj.num_steps and all(len(frame) == 2 for frame in frames)
    assert frames[-1] == texts
    assert all("¤" not in text for text in texts)  # (a completion holding it would blur the counts)
    for row in range(2):  # 2 tokens committed per step
        assert [frame[row].count("¤") for frame in frames] == [14, 12, 10, 8, 6, 4, 2, 0]
    bold = denoising_frames(tokenizer, traj, placeholder="¤", highlight=lambda text: f"\x01{text}\x02")
    # removing the marks gives the plain frames, and what is marked is what the step committed
    assert [[re.sub("[\x01\x02]", "", row) for row in frame] for frame in bold] == frames
    for t, frame in enumerate(bold):
        marked = "".join(re.findall("\x01(.*?)\x02", frame[0], flags=re.DOTALL))
        committed = traj.completions[0][traj.step_of_position[0] == t]
        assert marked == tokenizer.decode(committed, skip_special_tokens=True)


# -- egspo generate ----------------------------------------------------------------------------------


def test_cli_prompt(sudoku, capsys) -> None:
    dlm, tokenizer = sudoku
    expected = egspo.generate(dlm, tokenizer, [PUZZLE, OTHER], chat_template=True)
    assert main(["generate", "--model", "builtin:sudoku-tiny", "--prompt", PUZZLE]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
    assert main(["generate", "--model", "builtin:sudoku-tiny", "--prompt", PUZZLE, "--prompt", OTHER]) == 0
    assert capsys.readouterr().out == f"[1] {expected[0]}\n[2] {expected[1]}\n"
    # --raw: no chat template
    assert main(["generate", "--model", "builtin:sudoku-tiny", "--prompt", PUZZLE, "--raw",
                 "--gen-length", "16", "--block-length", "8", "--steps", "8"]) == 0
    assert capsys.readouterr().out == egspo.generate(dlm, tokenizer, PUZZLE, **FAST) + "\n"


def test_cli_input_files(sudoku, tmp_path: Path, capsys) -> None:
    dlm, tokenizer = sudoku
    jsonl = tmp_path / "prompts.jsonl"
    rows = [{"prompt": PUZZLE, "puzzle": "0000420003242430"},
            {"messages": [{"role": "user", "content": OTHER}], "id": 7}]
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", "builtin:sudoku-tiny", "--input", str(jsonl), "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    expected = egspo.generate(dlm, tokenizer, [PUZZLE, OTHER], chat_template=True)
    assert lines == [{**rows[0], "completion": expected[0]}, {**rows[1], "completion": expected[1]}]

    text = tmp_path / "prompts.txt"
    text.write_text(f"{PUZZLE}\n\n{OTHER}\n")
    assert main(["generate", "--model", "builtin:sudoku-tiny", "--input", str(text)]) == 0
    assert capsys.readouterr().out == f"[1] {expected[0]}\n[2] {expected[1]}\n"


def test_cli_show_steps(sudoku, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    dlm, tokenizer = sudoku
    final = egspo.generate(dlm, tokenizer, PUZZLE, chat_template=True)
    assert main(["generate", "--model", "builtin:sudoku-tiny", "--prompt", PUZZLE, "--show-steps"]) == 0
    out = capsys.readouterr().out
    headers = re.findall(r"^--- step (\d+)/(\d+) ---$", out, flags=re.MULTILINE)
    assert headers == [(str(i), "12") for i in range(1, 13)]  # one frame per step
    frames = re.split(r"^--- step \d+/\d+ ---\n", out, flags=re.MULTILINE)[1:]
    assert frames[-1] == final + "\n"
    assert "░" in frames[0] and "\x1b" not in out  # not a terminal: no escape codes
    counts = [frame.count("░") for frame in frames]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0

    # on a terminal: each frame clears the last, and each step's new tokens are bold
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["generate", "--model", "builtin:sudoku-tiny", "--prompt", PUZZLE, "--show-steps",
                 "--delay", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("\x1b[2J\x1b[H") == 12 and "\x1b[1m" in out
    last = out.rsplit("\x1b[2J\x1b[H", 1)[1]
    assert re.sub(r"\x1b\[[0-9]*m", "", last) == "--- step 12/12 ---\n" + final + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "Nothing to generate from: give --prompt TEXT"),
        (["--prompt", PUZZLE, "--gen-length", "30", "--block-length", "8"], "gen_length=30 is not a multiple"),
        (["--input", "missing.jsonl"], "--input missing.jsonl: no such file"),
    ],
)
def test_cli_bad_inputs(argv, message, caplog) -> None:
    assert main(["generate", "--model", "builtin:sudoku-tiny", *argv]) == 2
    assert message in caplog.text


def test_cli_bad_input_lines(tmp_path: Path, caplog) -> None:
    path = tmp_path / "bad.jsonl"
    for line, message in [('{"prompt": "a"}\n{"prompt": 1}', "line 2: 'prompt' must be a string"),
                          ('{"prompt": "a"', "line 1 is not valid JSON"),
                          ('{"text": "a"}', "line 1 needs exactly one of 'prompt'"),
                          ('{"messages": [{"role": "user"}]}', "line 1: 'messages' must be"),
                          ("\n\n", "holds no prompts")]:
        path.write_text(line)
        caplog.clear()
        assert main(["generate", "--model", "builtin:sudoku-tiny", "--input", str(path)]) == 2
        assert message in caplog.text
    with pytest.raises(SystemExit) as exit_info:  # argparse: --prompt and --input exclude each other
        main(["generate", "--model", "builtin:sudoku-tiny", "--prompt", "a", "--input", str(path)])
    assert exit_info.value.code == 2
