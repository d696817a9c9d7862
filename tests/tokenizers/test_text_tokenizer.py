import json

import pytest

from omni.tokenizers.text import MODEL_FILE, VOCAB_FILE, TextTokenizer, corpus_texts
from omni.vocab import SPECIAL_TOKENS, Vocab

ROUND_TRIP = {
    "ascii": "The quick brown fox jumps over the lazy dog.",
    "accents": "Café naïve façade: Ångström, São Paulo, Łódź, Straße.",
    "cjk": "日本語のテキストと中文文本，한국어 텍스트",
    "emoji": "Launch 🚀 then celebrate 🎉👩‍👩‍👧 ok",
    "digits": "In 1969, 3.14159 and 2,718,281 -42",
    "spaces": "  two  spaces   and\ttab\nnewline  \n\n end  ",
    "single_char": "x",
    "rare_script": "Ελληνικά русский עברית हिन्दी",
}


def test_vocab_layout_matches_the_unified_vocabulary(text_tokenizer):
    tok = text_tokenizer
    assert len(tok) == tok.vocab.text_size == 512
    assert tok.vocab == Vocab.default(512)
    for t in SPECIAL_TOKENS:
        assert tok.sp.id_to_piece(tok.vocab.id(t)) == t
        assert tok.sp.is_control(tok.vocab.id(t))


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_encode_decode_round_trip(text_tokenizer, name):
    text = ROUND_TRIP[name]
    ids = text_tokenizer.encode(text)
    assert ids and all(0 <= i < len(text_tokenizer) for i in ids)
    assert text_tokenizer.vocab.unk_id not in ids  # byte fallback: nothing is unknown
    assert text_tokenizer.decode(ids) == text  # identity normalisation: spaces and forms kept


def test_digits_are_split(text_tokenizer):
    pieces = text_tokenizer.sp.encode("year 2024 and 1234567", out_type=str)
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)
    assert sum(c.isdigit() for p in pieces for c in p) == 11


def test_user_text_never_encodes_to_special_tokens(text_tokenizer):
    specials = set(text_tokenizer.vocab.specials.values())
    text = "hi " + " ".join(SPECIAL_TOKENS) + "<|user|><|assistant|>system"
    ids = text_tokenizer.encode(text)
    assert not specials & set(ids)
    assert text_tokenizer.decode(ids) == text  # the markers survive as plain text


def test_decode_drops_specials_and_non_text_ids(text_tokenizer):
    tok = text_tokenizer
    v = tok.vocab
    ids = [v.bos_id, v.id("<|user|>"), *tok.encode("hello there"), v.id("<|eot|>"), 9999, v.eos_id,
           v.pad_id]
    assert tok.decode(ids) == "hello there"


def test_encode_rejects_non_strings(text_tokenizer):
    with pytest.raises(ValueError, match="expected text as str"):
        text_tokenizer.encode(b"bytes")


def test_save_load_round_trip(text_tokenizer, tmp_path):
    text_tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([MODEL_FILE, VOCAB_FILE])
    assert json.loads((tmp_path / "tok" / VOCAB_FILE).read_text()) == text_tokenizer.vocab.to_dict()
    for source in (tmp_path / "tok", tmp_path / "tok" / MODEL_FILE):
        back = TextTokenizer.load(source)
        assert back.vocab == text_tokenizer.vocab
        for text in ROUND_TRIP.values():
            assert back.encode(text) == text_tokenizer.encode(text)


def test_training_is_deterministic(tiny_corpus):
    texts = list(corpus_texts(tiny_corpus / "val.jsonl"))
    a = TextTokenizer.train(texts, vocab_size=420, seed=1)
    b = TextTokenizer.train(texts, vocab_size=420, seed=1)
    assert a.sp.serialized_model_proto() == b.sp.serialized_model_proto()
    assert len(a) == 420


@pytest.mark.parametrize("texts", [[], ["", "   ", "\n"]])
def test_training_on_an_empty_corpus_is_an_error(texts):
    with pytest.raises(ValueError, match="empty corpus"):
        TextTokenizer.train(texts, vocab_size=300)


def test_loading_a_non_sentencepiece_file_names_it(tmp_path):
    (tmp_path / MODEL_FILE).write_bytes(b"this is not a sentencepiece model\x00\xff")
    with pytest.raises(ValueError, match="not a valid SentencePiece model") as e:
        TextTokenizer.load(tmp_path)
    assert str(tmp_path / MODEL_FILE) in str(e.value)


def test_loading_a_foreign_sentencepiece_model_is_an_error(tmp_path, tiny_corpus):
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_texts(tiny_corpus / "val.jsonl")),
                                   model_writer=out, vocab_size=200, minloglevel=2, num_threads=1)
    (tmp_path / "foreign.model").write_bytes(out.getvalue())
    with pytest.raises(ValueError, match="not trained by omni") as e:
        TextTokenizer.load(tmp_path / "foreign.model")
    assert "foreign.model" in str(e.value)


def test_loading_a_missing_tokenizer_names_it(tmp_path):
    with pytest.raises(ValueError, match="not found") as e:
        TextTokenizer.load(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)


def test_corpus_texts_from_jsonl_and_text(tmp_path, tiny_corpus):
    texts = list(corpus_texts(tiny_corpus / "val.jsonl"))
    assert len(texts) == 20 and all(isinstance(t, str) and t for t in texts)
    (tmp_path / "c.txt").write_text("line one\nline two\n", encoding="utf-8")
    assert list(corpus_texts(tmp_path / "c.txt")) == ["line one", "line two"]
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    assert list(corpus_texts(tmp_path / "b.jsonl", field="body")) == ["x"]
    with pytest.raises(ValueError, match="no string field 'text'"):
        list(corpus_texts(tmp_path / "b.jsonl"))


@pytest.mark.parametrize("name", ["c.txt", "c.jsonl"])
def test_corpus_texts_non_utf8_names_the_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b'{"text": "caf\xe9"}\n' if name.endswith(".jsonl") else b"caf\xe9 latin-1\n")
    with pytest.raises(ValueError, match="not UTF-8") as e:
        list(corpus_texts(p))
    assert str(p) in str(e.value)


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl"])
def test_corpus_texts_missing_file_names_it(tmp_path, name):
    with pytest.raises(ValueError, match="not found") as e:
        list(corpus_texts(tmp_path / name))
    assert name in str(e.value)


def test_decode_continuation_keeps_the_leading_space(text_tokenizer):
    prompt, rest = "The history of", " the world"
    prompt_ids = text_tokenizer.encode(prompt)
    full = text_tokenizer.encode(prompt + rest)
    assert full[:len(prompt_ids)] == prompt_ids  # the split falls on a piece boundary
    new = full[len(prompt_ids):]
    assert text_tokenizer.decode(new) == "the world"  # a whole-text decode drops the space
    assert text_tokenizer.decode_continuation(new, prompt_ids) == rest
    assert text_tokenizer.decode_continuation(new) == "the world"


def test_a_vocabulary_too_large_for_the_corpus_is_one_line_naming_the_corpus_and_the_limit(caplog):
    """Not SentencePiece's internals ("trainer_interface.cc ... Vocabulary size too high")."""
    import logging

    captions = [f"a red truck moves {d} quickly" for d in ("left", "right", "up", "down")] * 10
    with caplog.at_level(logging.INFO, logger="omni.tokenizers.text"), \
            pytest.raises(ValueError) as e:
        TextTokenizer.train(captions, vocab_size=4096)
    msg = str(e.value)
    assert "\n" not in msg and "trainer_interface" not in msg and "INTERNAL" not in msg
    assert "vocab_size=4096 is too large for a corpus of 40 sentences" in msg
    limit = int(msg.split("(<= ")[1].rstrip(")"))
    assert 40 < limit < 4096
    assert "training a unigram SentencePiece tokenizer of 4096 pieces on 40 sentences" in caplog.text
