"""Tests for tokenizer.py: GPT-2 ids, offline fallback, decode round trips, caching."""

from __future__ import annotations

import pytest
from transformers import GPT2TokenizerFast

import tokenizer as tokenizer_mod
from tokenizer import EOS_ID, EOS_TOKEN, VOCAB_SIZE, build_offline_tokenizer, get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world", [15496, 995]),
        (" the", [262]),
        ("\n", [198]),
        (" ", [220]),
        ("!", [0]),
        (",", [11]),
        (".", [13]),
        (" a", [257]),
        (EOS_TOKEN, [EOS_ID]),
    ],
)
def test_known_gpt2_ids(tok, text, ids):
    assert _ids(tok, text) == ids


def test_special_tokens_and_vocab(tok):
    assert len(tok) == VOCAB_SIZE
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == EOS_ID
    assert tok.bos_token_id == EOS_ID and tok.unk_token_id == EOS_ID
    assert tok.pad_token_id == EOS_ID
    # No BOS/EOS is added implicitly.
    assert tok("Hello world")["input_ids"] == [15496, 995]


@pytest.mark.parametrize(
    "text",
    [
        "  two leading spaces\n\nand blank lines\n",
        "\n\tTabbed\r\nWindows line",
        "Ünïcödé: 你好, мир, 🤖🚀, ∑_{i=1}^n x_i² ≤ π",
        "",
    ],
)
def test_decode_round_trip(tok, text):
    assert tok.decode(_ids(tok, text)) == text


def test_cached_instance():
    assert get_tokenizer() is get_tokenizer()


def test_offline_builder_matches(tok):
    offline = build_offline_tokenizer()
    text = "Question: 23 + 45 = ?\nAnswer: 68 <|endoftext|> done. 🤖"
    assert _ids(offline, text) == _ids(tok, text)
    assert offline.eos_token_id == EOS_ID


@pytest.fixture
def fresh_cache():
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def test_falls_back_when_hub_cache_missing(monkeypatch, fresh_cache):
    def missing(*args, **kwargs):
        raise OSError("gpt2 is not in the local cache")

    monkeypatch.setattr(tokenizer_mod.GPT2TokenizerFast, "from_pretrained", missing)
    tok = get_tokenizer()
    assert _ids(tok, "Hello world") == [15496, 995]
    assert tok.pad_token_id == EOS_ID


def test_falls_back_when_hub_returns_empty_stub(monkeypatch, fresh_cache):
    # transformers can "load" gpt2 without any files and return a vocabulary-less stub.
    stub = GPT2TokenizerFast(vocab={}, merges=[])
    monkeypatch.setattr(tokenizer_mod.GPT2TokenizerFast, "from_pretrained", lambda *a, **k: stub)
    tok = get_tokenizer()
    assert tok is not stub
    assert _ids(tok, "Hello world") == [15496, 995]
