import pytest
from transformers import AutoTokenizer

from egspo.models.tokenizer import CHARACTERS, SPECIAL_TOKENS, TAG_TOKENS, build_char_tokenizer

TASK_TEXTS = [
    "0204100030020100",  # Sudoku puzzle
    "(95 - 41) * 2 / 3",  # Countdown expression
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n"
    "How many clips did Natalia sell altogether?  #### 72",
    "<reasoning>\n48 / 2 = 24; 48 + 24 = 72\n</reasoning>\n<answer>\n\\boxed{72}\n</answer>",
    "   leading and trailing spaces  ",
    "".join(CHARACTERS),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.mark.parametrize("text", TASK_TEXTS)
def test_roundtrip_is_exact(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_and_small_vocab(tokenizer):
    assert 100 <= len(tokenizer) <= 130
    assert tokenizer.mask_token == "<|mdm_mask|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.unk_token == "<|unk|>"
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tokenizer.bos_token_id is None
    assert tokenizer.padding_side == "left"


def test_tags_are_single_tokens_and_no_bos_eos_added(tokenizer):
    for tag in TAG_TOKENS:
        assert len(tokenizer(tag)["input_ids"]) == 1
    assert tokenizer("ab")["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in "ab"]


def test_unknown_characters_become_unk(tokenizer):
    ids = tokenizer("a\tb\u00e9")["input_ids"]
    assert ids[1] == ids[3] == tokenizer.unk_token_id and len(ids) == 4


def test_specials_decode_and_skip(tokenizer):
    ids = tokenizer("<answer>7</answer>")["input_ids"] + [tokenizer.eos_token_id, tokenizer.mask_token_id]
    assert tokenizer.decode(ids) == "<answer>7</answer><|endoftext|><|mdm_mask|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<answer>7</answer>"


def test_ids_are_deterministic():
    a, b = build_char_tokenizer(), build_char_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a(TASK_TEXTS[3])["input_ids"] == b(TASK_TEXTS[3])["input_ids"]


def test_left_padding(tokenizer):
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1]


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.\n<|user|>1+1?\n<|assistant|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|system|>") and len(ids) == 1 + 9 + 1 + 1 + 4 + 1 + 1


def test_save_and_auto_load_roundtrip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.padding_side == "left" and loaded.mask_token_id == tokenizer.mask_token_id
    assert loaded.chat_template == tokenizer.chat_template
    for text in TASK_TEXTS[:4]:
        ids = loaded(text)["input_ids"]
        assert ids == tokenizer(text)["input_ids"] and loaded.decode(ids) == text
