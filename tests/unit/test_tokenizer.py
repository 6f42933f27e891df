"""Tokenizers: byte-level round trips and ids; Hugging Face tokenizer.json loading and eot detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from titan.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["plain ASCII, with punctuation: (a + b) * c\n\tand a tab.", "héllo wörld, ünïcödé — façade, 日本語のテキスト",
         "emoji 🙂🚀 and a family 👩‍👩‍👧 joined by ZWJ", ""]


def train_tokenizer(path: Path, special_tokens: list[str]) -> Path:
    """A small byte-level BPE trained on pydoc text, saved as a tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer)
    tok.save(str(path))
    return path


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_byte_ids_and_eot():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode(tok.encode("ab") + [tok.eot_id] + tok.encode("🙂")) == "ab🙂"


def test_hf_round_trip_and_eot_detection(tmp_path):
    path = train_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>"])
    raw = Tokenizer.from_file(str(path))
    for spec in (str(path), str(tmp_path)):  # the file, or the folder holding it
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == 400
        assert tok.eot_id == raw.token_to_id("<|endoftext|>")
        batch = tok.encode_batch(TEXTS)
        for text, ids in zip(TEXTS, batch):
            assert ids == tok.encode(text)
            assert tok.eot_id not in ids
            assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0])  # merges were learned


def test_hf_explicit_eot_token(tmp_path):
    path = train_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>", "<doc_end>"])
    tok = load_tokenizer(str(path), eot_token="<doc_end>")
    assert tok.eot_id == Tokenizer.from_file(str(path)).token_to_id("<doc_end>")
    assert tok.eot_id != load_tokenizer(str(path)).eot_id
    with pytest.raises(KeyError, match="<absent>"):
        load_tokenizer(str(path), eot_token="<absent>")


def test_hf_without_eot_token_raises(tmp_path):
    path = train_tokenizer(tmp_path / "tokenizer.json", ["<pad>"])
    with pytest.raises(KeyError, match="end-of-text"):
        load_tokenizer(str(path))
