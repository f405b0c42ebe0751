import base64

import pytest

from engine.data import load_tokenizer
from engine.data.tokenizer import GLM4_SPECIAL_TOKENS, LLAMA3_SPECIAL_TOKENS

TEXTS = [
    "Hello, world!",
    "写一篇关于长城的文章。\n\n  indented\ttab",
    "<|im_end|> [gMASK] <|user|> stays text",
    "",
]


@pytest.mark.parametrize(
    "flavour,template", [("debug-qwen2", "qwen"), ("debug-glm4", "glm4"), ("debug-llama", "llama3")]
)
def test_debug_tokenizer_bytes_and_specials(flavour, template):
    tok = load_tokenizer(flavour)
    assert tok.template == template
    assert tok.vocab_size < 300
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))  # ids 0..255 are the bytes; specials never parsed
        assert tok.decode(ids) == text
    first_special = 256
    if template == "qwen":
        assert tok.token_id("<|endoftext|>") == first_special
        assert tok.token_id("<|im_end|>") in tok.eos_token_ids
    elif template == "llama3":
        assert [tok.token_id(t) for t in LLAMA3_SPECIAL_TOKENS] == list(
            range(256, 256 + len(LLAMA3_SPECIAL_TOKENS))
        )
        assert tok.eos_token_ids[0] == tok.token_id("<|eot_id|>")
    else:
        assert [tok.token_id(t) for t in GLM4_SPECIAL_TOKENS] == list(
            range(256, 256 + len(GLM4_SPECIAL_TOKENS))
        )
        assert tok.token_id("<|user|>") in tok.eos_token_ids
    with pytest.raises(KeyError):
        tok.token_id("<not-a-token>")
    import pickle  # DataLoader workers under spawn get a pickled copy

    assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[2]) == list(TEXTS[2].encode())


@pytest.mark.parametrize("flavour", ["debug-qwen2", "debug-glm4", "debug-llama"])
def test_debug_tokenizer_saves_for_transformers(flavour, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(flavour)
    tok.save_pretrained(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS[:2]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    again = load_tokenizer(str(tmp_path))
    # the saved template is the one trained, now read from the saved tokenizer_config.json
    assert again.chat_template.source == tok.chat_template.source and again.family == tok.family
    assert again.template == str(tmp_path / "tokenizer_config.json")
    assert again.eos_token_ids == tok.eos_token_ids
    assert again.special_tokens == tok.special_tokens
    assert again.fingerprint == tok.fingerprint


EXTRA_MERGES = (b"He", b"ll", b"llo", "长".encode()[:2], "长".encode())


def _write_fake_glm4_model(path):
    ranks = [bytes([b]) for b in range(256)] + list(EXTRA_MERGES)
    with open(path, "w") as f:
        for r, t in enumerate(ranks):
            f.write(f"{base64.b64encode(t).decode()} {r}\n")
    return len(ranks)


def test_glm4_tiktoken_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.model"
    n = _write_fake_glm4_model(path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.template == "glm4"
    # Special ids follow the ranks, in GLM-4's order (151329.. for the real 151329-rank file).
    assert tok.token_id("<|endoftext|>") == n
    assert tok.token_id("[gMASK]") == n + 2 and tok.token_id("<sop>") == n + 4
    assert tok.token_id("<|user|>") == n + 7 and tok.token_id("<|assistant|>") == n + 8
    assert tok.vocab_size == n + len(GLM4_SPECIAL_TOKENS)
    ids = tok.encode("Hello 长城")
    assert ids[:2] == [256, 258]  # "He", "llo"
    assert 260 in ids  # "长" through its 2-byte prefix merge
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.token_id("<|user|>") not in tok.encode("<|user|>")
    assert tok.decode([tok.token_id("<|user|>")]) == "<|user|>"
    import pickle

    assert pickle.loads(pickle.dumps(tok)).encode("Hello") == tok.encode("Hello")


def test_glm4_tiktoken_saves_an_equivalent_tokenizer_json(tmp_path):
    from transformers import AutoTokenizer

    _write_fake_glm4_model(tmp_path / "tokenizer.model")
    tok = load_tokenizer(str(tmp_path / "tokenizer.model"))
    out = tmp_path / "saved"
    tok.save_pretrained(str(out))
    hf = AutoTokenizer.from_pretrained(str(out))
    again = load_tokenizer(str(out))  # now the tokenizer.json
    assert again.family == "glm4" and again.chat_template.source == tok.chat_template.source
    assert again.special_tokens == tok.special_tokens
    assert again.eos_token_ids == tok.eos_token_ids
    for text in [*TEXTS, "Hello hello HELLO llo 长长城\n\n\nHe's 12345 done!!"]:
        ids = tok.encode(text)
        assert again.encode(text) == ids
        if "<|" not in text:  # transformers parses special-token text; our encode never does
            assert hf.encode(text, add_special_tokens=False) == ids


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(["the quick brown fox jumps over the lazy dog", "长城 很 长", "hello world"] * 50)
    )
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=36,
        control_symbols=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        minloglevel=2,
    )
    tok = load_tokenizer(str(prefix) + ".model")
    assert tok.template == "qwen"
    assert tok.token_id("<|im_end|>") in tok.eos_token_ids
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    assert tok.token_id("<|im_end|>") not in tok.encode("<|im_end|>")
    assert tok.decode([tok.token_id("<|im_start|>")] + ids) == "<|im_start|>hello world"


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("no-such-flavour")


def test_tokenizer_json_gets_added_tokens_from_tokenizer_config(tmp_path):
    import json

    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import AutoTokenizer

    from engine.data.chat import encode_conversations
    from engine.data.tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    rust = RustTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    rust.save(str(tmp_path / "tokenizer.json"))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # declared "special": false: "<tool>" stays an ordinary added token, "<pad>" is special all the same
    # because the config names it (pad_token), as transformers decides
    declared = [*((t, True) for t in specials), ("<tool>", False), ("<pad>", False)]
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "added_tokens_decoder": {
            str(256 + i): {"content": t, "special": special} for i, (t, special) in enumerate(declared)
        },
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 256]}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.template == "qwen"
    assert [tok.token_id(t) for t in specials] == [256, 257, 258]
    assert tok.eos_token_ids[0] == 258 and set(tok.eos_token_ids) == {256, 258}
    assert tok.encode("<|im_end|>") == list(b"<|im_end|>")
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.added_tokens == {t.content: (i, t.special) for i, t in hf.added_tokens_decoder.items()}
    assert tok.added_tokens["<tool>"] == (259, False) and tok.added_tokens["<pad>"] == (260, True)
    # a non-special added token in a message is a token, as in transformers
    msgs = [{"role": "user", "content": "call <tool> now"}, {"role": "assistant", "content": "Done."}]
    ((ids, _),) = encode_conversations(tok, [msgs])
    want = hf.apply_chat_template(
        msgs,
        chat_template=tok.chat_template.source,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )
    assert ids.tolist() == want and 259 in want


@pytest.mark.parametrize("flavour", ["debug-qwen2", "debug-glm4", "debug-llama"])
def test_debug_tokenizer_agrees_with_the_debug_model(flavour):
    import engine.models as models

    if not hasattr(models, "FLAVOURS"):
        pytest.skip("engine.models.FLAVOURS not available")
    args = models.FLAVOURS[flavour]
    tok = load_tokenizer(flavour)
    assert tok.vocab_size <= args.vocab_size
    assert set(tok.eos_token_ids) == set(args.eos_token_ids)
