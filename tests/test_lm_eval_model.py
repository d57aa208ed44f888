"""The lm-evaluation-harness model ``egspo``: the Monte Carlo log-likelihood, generation, and lm-eval runs
of small local tasks on the built-in tiny model (skipped without the ``eval`` extra)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from egspo.cli import main as cli_main  # noqa: E402
from egspo.config import ModelConfig, SamplerConfig  # noqa: E402
from egspo.lm_eval_model import (  # noqa: E402
    EgspoLM,
    cut_at_stop_strings,
    decode_completions,
    draw_masks,
    masked_loglikelihood,
)
from egspo.models.adapter import DiffusionLM  # noqa: E402
from egspo.models.loading import load_model  # noqa: E402
from egspo.models.tokenizer import build_char_tokenizer  # noqa: E402
from egspo.rl.batching import encode_prompts  # noqa: E402
from egspo.sampling import sample  # noqa: E402

TINY_ARGS = "pretrained=builtin:tiny,gen_length=32,block_length=16,steps=4,batch_size=8,mc_num=8,mc_batch_size=4"
MASK_ID = 9


# -- the Monte Carlo estimator on a model with fixed logits --------------------------------------


class FixedLogits(nn.Module):
    """Logits that depend only on the position (``table[position]``), whatever the input; records inputs."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.inputs: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        self.inputs.append(input_ids.clone())
        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.table[:length].expand(batch, length, -1))


def fixed_dlm(table: torch.Tensor, shift: int = 0) -> DiffusionLM:
    return DiffusionLM(model=FixedLogits(table), mask_id=MASK_ID, stop_ids=(0,), shift=shift)


def exact_loglikelihood(table: torch.Tensor, start: int, continuation: list[int]) -> float:
    """log p of each continuation token at its (aligned) position, summed: what the estimator targets."""
    logp = torch.log_softmax(table.double(), dim=-1)
    return sum(float(logp[start + i, token]) for i, token in enumerate(continuation))


def test_uniform_logits_give_the_exact_value_with_the_count_sampler():
    vocab, context, continuation = 12, [1, 2, 3], [4, 5, 6, 7]
    dlm = fixed_dlm(torch.zeros(16, vocab))
    value, _ = masked_loglikelihood(dlm, context, continuation, mc_num=5, mc_batch_size=2, sampler="count",
                                    generator=torch.Generator().manual_seed(0))
    # every sample masks l tokens of cross-entropy log V each, weighted by L / l
    assert value == pytest.approx(-len(continuation) * math.log(vocab), rel=1e-6)


def test_single_token_continuation_is_exact_with_the_count_sampler():
    table = torch.randn(8, 11, generator=torch.Generator().manual_seed(1))
    value, _ = masked_loglikelihood(fixed_dlm(table), [1, 2], [5], mc_num=3, mc_batch_size=3, sampler="count",
                                    generator=torch.Generator().manual_seed(0))
    assert value == pytest.approx(exact_loglikelihood(table, 2, [5]), rel=1e-6)  # always masked, weight 1


@pytest.mark.parametrize("sampler", ["count", "ratio"])
def test_estimate_is_unbiased(sampler):
    table = torch.randn(10, 12, generator=torch.Generator().manual_seed(2)) * 2
    context, continuation = [1, 2], [3, 4, 5, 6, 0]
    exact = exact_loglikelihood(table, len(context), continuation)
    values = [
        masked_loglikelihood(fixed_dlm(table), context, continuation, mc_num=256, mc_batch_size=256,
                             sampler=sampler, generator=torch.Generator().manual_seed(seed))[0]
        for seed in range(40)
    ]
    mean = sum(values) / len(values)
    stderr = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
    # unweighted sums would be about half the exact value: far outside this band
    assert abs(mean - exact) < max(4 * stderr, 0.01 * abs(exact)), (mean, exact, stderr)


def test_context_is_never_masked_and_samples_are_batched():
    table = torch.randn(12, 10, generator=torch.Generator().manual_seed(3))
    dlm = fixed_dlm(table)
    context, continuation = [1, 2, 3, 4], [5, 6, 7]
    masked_loglikelihood(dlm, context, continuation, mc_num=10, mc_batch_size=4, sampler="ratio",
                         generator=torch.Generator().manual_seed(0))
    inputs = dlm.model.inputs
    # 10 samples in forwards of 4, 4, 2, plus the fully masked row (is_greedy) in the first
    assert [x.shape[0] for x in inputs] == [5, 4, 2]
    rows = torch.cat(inputs)
    assert (rows[:, :4] == torch.tensor(context)).all()
    tail = rows[:, 4:]
    assert ((tail == MASK_ID) | (tail == torch.tensor(continuation))).all()
    assert (inputs[0][-1, 4:] == MASK_ID).all()


def test_is_greedy_is_the_one_step_argmax_without_the_mask_token():
    vocab = 10
    table = torch.zeros(6, vocab)
    continuation = [4, 7]
    table[2, 4] = 5.0
    table[3, 7] = 5.0
    table[3, MASK_ID] = 9.0  # the mask token is never a prediction
    args = dict(mc_num=2, mc_batch_size=2, generator=torch.Generator().manual_seed(0))
    assert masked_loglikelihood(fixed_dlm(table), [1, 2], continuation, **args)[1] is True
    args["generator"] = torch.Generator().manual_seed(0)
    assert masked_loglikelihood(fixed_dlm(table), [1, 2], [4, 8], **args)[1] is False


def test_shifted_models_score_each_token_from_the_previous_position():
    table = torch.randn(8, 11, generator=torch.Generator().manual_seed(4))
    value, _ = masked_loglikelihood(fixed_dlm(table, shift=1), [1, 2, 3], [6], mc_num=2, mc_batch_size=2,
                                    generator=torch.Generator().manual_seed(0))
    assert value == pytest.approx(exact_loglikelihood(table, 2, [6]), rel=1e-6)


def test_draw_masks_are_stratified_and_reproducible():
    gen = torch.Generator().manual_seed(5)
    masks, weights = draw_masks(8, 8, "count", gen, torch.device("cpu"))
    counts = masks.sum(1)
    assert sorted(counts.tolist()) == list(range(1, 9))  # one sample per count 1..8
    assert torch.allclose(weights, 8 / counts.double())
    again = draw_masks(8, 8, "count", torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(masks, again[0])
    masks, weights = draw_masks(4, 2000, "ratio", torch.Generator().manual_seed(6), torch.device("cpu"))
    ratios = 1 / weights
    assert all(j / 4 < r <= (j + 1) / 4 for j, r in enumerate(ratios.tolist()))
    assert torch.allclose(masks.double().mean(1), ratios, atol=0.05)


def test_cut_at_stop_strings_takes_the_earliest():
    assert cut_at_stop_strings("abc\n\nde<|x|>f", ["<|x|>", "\n\n"]) == "abc"
    assert cut_at_stop_strings("abc", ["", "z"]) == "abc"


def test_completions_end_at_the_first_end_token_then_max_tokens_then_until():
    tokenizer = build_char_tokenizer()
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("ab<|endoftext|>cd", "abcdef", "a<|pad|>bc")]
    assert [len(i) for i in ids] == [5, 6, 4]
    rows = torch.tensor([i + [tokenizer.pad_token_id] * (6 - len(i)) for i in ids])
    stop_ids = (tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = decode_completions(tokenizer, rows, stop_ids, [None, 4, None], [[], [], []])
    assert texts == ["ab", "abcd", "a"]  # not "abcd": tokens after an end token are dropped, not skipped
    assert decode_completions(tokenizer, rows, stop_ids, [None, 5, 2], [["b"], ["d"], []]) == ["a", "abc", "a"]


# -- the lm-eval model on the tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm() -> EgspoLM:
    return EgspoLM.create_from_arg_string(TINY_ARGS, {"batch_size": 1, "device": "cpu"})


@pytest.fixture(scope="module")
def reference():
    """egspo's own loading of the same model, for the sampler's output on the same prompts."""
    return load_model(ModelConfig(name_or_path="builtin:tiny"), device="cpu")


def reference_texts(
    reference, prompts: list[str], max_tokens: int | None, until: list[str], gen_length: int = 32, steps: int = 4
) -> list[str]:
    """egspo's sampler (one batch, greedy, block 16), each completion cut as the model documents: at its
    first end token, after max_tokens tokens, at the first until string."""
    dlm, tokenizer = reference
    width = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    ids, mask = encode_prompts(tokenizer, prompts, width, torch.device("cpu"))
    config = SamplerConfig(gen_length=gen_length, block_length=16, steps=steps, temperature=0.0)
    completions = sample(dlm, ids, config, attention_mask=mask, record_greedy=False).completions
    return decode_completions(tokenizer, completions, dlm.stop_ids, [max_tokens] * len(prompts), [until] * len(prompts))


def test_model_args_win_over_lm_eval_defaults(tiny_lm):
    assert tiny_lm.batch_size == 8 and tiny_lm.device.type == "cpu"
    assert (tiny_lm.gen_length, tiny_lm.block_length, tiny_lm.steps, tiny_lm.mc_num) == (32, 16, 4, 8)
    with pytest.raises(ValueError, match="block_length"):
        EgspoLM(pretrained="builtin:tiny", gen_length=40, block_length=16)


def test_request_settings_follow_max_gen_toks_and_sampling(tiny_lm):
    assert tiny_lm._sampler_length(None) == 32
    assert tiny_lm._sampler_length(20) == 32 and tiny_lm._sampler_length(33) == 48
    assert tiny_lm._sampler_config(64, 0.0).steps == 8  # the ratio steps / gen_length is kept
    assert tiny_lm._request_settings({"until": "\n", "max_gen_toks": 7}) == (7, 0.0, ["\n"])
    assert tiny_lm._request_settings({"do_sample": True, "temperature": 0.7})[1] == 0.7
    assert tiny_lm._request_settings({"do_sample": False, "temperature": 0.7})[1] == 0.0


def test_generate_until_matches_egspos_sampler(tiny_lm, reference):
    prompts = ["What is 2+2?\n", "Sort: 3 1 2\n", "Hi"]
    uncut = reference_texts(reference, prompts, None, [])
    stop = uncut[1][len(uncut[1]) // 2]  # a string that occurs in the second completion
    kwargs = [{"until": ["\n\n"]}, {"until": stop}, {"until": [], "max_gen_toks": 20}]
    requests = [Instance("generate_until", {}, (p, k), i) for i, (p, k) in enumerate(zip(prompts, kwargs))]
    texts = tiny_lm.generate_until(requests)
    assert texts[0] == uncut[0]
    assert texts[1] == uncut[1][: uncut[1].index(stop)]
    assert texts[2] == uncut[2][:20] and len(uncut[2]) > 20  # one character per token: cut to max_gen_toks


def test_max_gen_toks_sets_the_sampler_length(tiny_lm, reference):
    prompts = ["What is 2+2?\n", "Hi"]
    requests = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 7}), i) for i, p in enumerate(prompts)]
    # 7 tokens -> one block of 16, steps scaled from 4 per 32 tokens to 2; then cut to 7 tokens
    assert tiny_lm.generate_until(requests) == reference_texts(reference, prompts, 7, [], gen_length=16, steps=2)


def test_loglikelihood_requests_are_reproducible(tiny_lm):
    requests = [Instance("loglikelihood", {}, ("Q: 1+1=", " 2"), 0), Instance("loglikelihood", {}, ("", "abc"), 1)]
    first = tiny_lm.loglikelihood(requests)
    assert first == tiny_lm.loglikelihood(list(reversed(requests)))[::-1]
    assert all(value < 0 and isinstance(greedy, bool) for value, greedy in first)


def test_loglikelihood_rolling_explains_itself(tiny_lm):
    with pytest.raises(NotImplementedError, match="perplexity"):
        tiny_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("text",), 0)])


# -- whole lm-eval runs on local tasks ----------------------------------------------------------

GEN_ROWS = [{"question": "2+2=", "answer": "4"}, {"question": "Say hi:", "answer": "hi"},
            {"question": "Count: 1 2 3", "answer": "4"}]
MC_ROWS = [{"question": "2+2=", "choices": ["4", "5", "22"], "label": 0},
           {"question": "The sky is", "choices": [" blue", " green"], "label": 0}]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in (("gen", GEN_ROWS), ("mc", MC_ROWS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        "egspo_tiny_gen": {
            **common, "dataset_kwargs": {"data_files": {"test": str(root / "gen.jsonl")}},
            "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 20, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
        "egspo_tiny_mc": {
            **common, "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}},
            "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}],
        },
    }
    for name, config in tasks.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **config}, sort_keys=False))
    return root


def test_simple_evaluate_generation_and_multiple_choice(task_dir, reference):
    out = lm_eval.simple_evaluate(
        model="egspo", model_args=TINY_ARGS, tasks=["egspo_tiny_gen", "egspo_tiny_mc"], device="cpu",
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), log_samples=True,
    )
    results = out["results"]
    assert 0.0 <= results["egspo_tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["egspo_tiny_mc"]["acc,none"] <= 1.0
    samples = sorted(out["samples"]["egspo_tiny_gen"], key=lambda s: s["doc_id"])
    prompts = [row["question"] for row in GEN_ROWS]
    assert [s["arguments"][0][0] for s in samples] == prompts
    assert [s["resps"][0][0] for s in samples] == reference_texts(reference, prompts, 20, ["\n\n"])
    mc = out["samples"]["egspo_tiny_mc"]
    assert sum(len(s["resps"]) for s in mc) == 5  # one loglikelihood per choice


def test_chat_template_is_applied_when_lm_eval_asks(task_dir):
    out = lm_eval.simple_evaluate(
        model="egspo", model_args=TINY_ARGS, tasks=["egspo_tiny_gen"], device="cpu", limit=1,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), log_samples=True,
        apply_chat_template=True,
    )
    context = out["samples"]["egspo_tiny_gen"][0]["arguments"][0][0]
    assert context == "<|user|>2+2=\n<|assistant|>"  # the character tokenizer's chat template


def test_the_import_registers_egspo_beside_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    assert get_model("egspo") is EgspoLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's models are still found


def test_egspo_lm_eval_passes_every_argument_to_lm_eval(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["lm-eval", "run", "--help"])
    assert exit_info.value.code == 0
    assert "--model_args" in capsys.readouterr().out  # lm-eval's own help, not egspo's


@pytest.mark.slow
def test_egspo_lm_eval_runs_a_task(task_dir, tmp_path):
    # slow: lm-eval's command line indexes all of its built-in tasks first
    code = cli_main(["lm-eval", "--model", "egspo", "--model_args", TINY_ARGS, "--tasks", "egspo_tiny_mc",
                     "--include_path", str(task_dir), "--device", "cpu", "--output_path", str(tmp_path)])
    assert code == 0
    (results_file,) = tmp_path.rglob("results*.json")
    assert "acc,none" in json.loads(results_file.read_text())["results"]["egspo_tiny_mc"]
