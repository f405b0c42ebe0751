"""Label masks of the built-in templates (qwen, glm4, llama3, longwriter), token by token against the template
text; the checkpoint templates against transformers are in test_data_template.py."""

import pytest

from engine.data import encode_generation_prompt, load_tokenizer
from engine.data.chat import aligned_labels, encode_conversations, normalize_row
from engine.data.template import BUILTIN_TEMPLATES

EN_LONG = "# Lighthouses\n\nLighthouses guided ships for centuries.\n\n  Keepers lived in them.   "
ZH_LONG = "# 长城的历史\n\n长城是中国古代的军事防御工程。人们围绕长城重新认识了社会的记忆。"
CONVERSATIONS = {
    "en_single": [
        {"role": "user", "content": "Write an article about lighthouses in 300 words."},
        {"role": "assistant", "content": EN_LONG},
    ],
    "zh_single_system": [
        {"role": "system", "content": "你是一个乐于助人的写作助手。"},
        {"role": "user", "content": "请以“长城的历史”为主题写一篇文章。"},
        {"role": "assistant", "content": ZH_LONG},
    ],
    "mixed_multi_turn": [
        {"role": "system", "content": "You are a careful writing assistant."},
        {"role": "user", "content": "一年有几个季节？"},
        {"role": "assistant", "content": "一年有四个季节。"},
        {"role": "user", "content": "Name three primary colours <|im_end|> [gMASK] <|user|>."},
        {"role": "assistant", "content": "Red, blue and yellow.\n"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "\n\nYou're welcome."},
    ],
}


def labelled_spans(ids, labels):
    """Contiguous runs of target tokens (the tokens that labels point at), as id lists."""
    spans, cur = [], []
    for i in range(len(ids)):
        is_target = i > 0 and labels[i - 1] != -100
        if is_target:
            assert labels[i - 1] == ids[i]  # aligned: label at i-1 is the token at i
            cur.append(ids[i])
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def expected_spans(template, messages):
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if template == "qwen":
        return [r + "<|im_end|>" for r in replies]
    if template == "llama3":
        return [r + "<|eot_id|>" for r in replies]
    return ["\n" + r + "<|user|>" for r in replies]


def expected_text(template, messages):
    if template == "qwen":
        sys = (
            ""
            if messages[0]["role"] == "system"
            else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        )
        return sys + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if template == "llama3":
        turns = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
        )
        return "<|begin_of_text|>" + turns
    return "[gMASK]<sop>" + "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages) + "<|user|>"


@pytest.fixture(scope="module", params=["debug-qwen2", "debug-glm4", "glm4-tiktoken", "debug-llama"])
def tok(request, tmp_path_factory):
    if request.param == "glm4-tiktoken":
        import base64

        d = tmp_path_factory.mktemp("glm4")
        merges = [bytes([b]) for b in range(256)] + [
            b"\n\n",
            b"th",
            b"the",
            b"Li",
            "长".encode()[:2],
            "长".encode(),
        ]
        with open(d / "tokenizer.model", "w") as f:
            f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(merges))
        return load_tokenizer(str(d))
    return load_tokenizer(request.param)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_labels_cover_exactly_the_replies(tok, name):
    messages = CONVERSATIONS[name]
    ((ids, mask),) = encode_conversations(tok, [messages])
    labels = aligned_labels(ids, mask)
    assert labels[-1] == -100 and len(labels) == len(ids)
    spans = labelled_spans(ids.tolist(), labels.tolist())
    assert [tok.decode(s) for s in spans] == expected_spans(tok.template, messages)
    # Everything else is prompt: the whole rendering decodes to the template text.
    assert tok.decode(ids.tolist()) == expected_text(tok.template, messages)
    # Special tokens inside user text stay text.
    n_special = sum(1 for i in ids.tolist() if i in set(tok.special_tokens.values()))
    per_msg = {"qwen": 2, "glm4": 1, "llama3": 3}[tok.template]
    n_msgs = len(messages) + (tok.template == "qwen" and messages[0]["role"] != "system")
    assert n_special == per_msg * n_msgs + {"qwen": 0, "glm4": 3, "llama3": 1}[tok.template]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chatml_matches_transformers_apply_chat_template(name, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer("debug-qwen2")
    tok.save_pretrained(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = CONVERSATIONS[name]
    ((ids, _),) = encode_conversations(tok, [messages])
    assert tok.decode(ids.tolist()) == hf.apply_chat_template(messages, tokenize=False)
    prompt = messages[:-1]
    gen = encode_generation_prompt(tok, prompt)
    assert tok.decode(gen) == hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # Byte-level tokenizer: the template's token ids agree with transformers' own encoding of the text
    # (except where a user writes special-token text, which transformers parses and we keep as text).
    if not any("<|" in m["content"] for m in prompt):
        assert gen == hf.apply_chat_template(
            prompt, tokenize=True, add_generation_prompt=True, return_dict=False
        )


def test_glm4_generation_prompt_matches_its_template():
    import jinja2

    tok = load_tokenizer("debug-glm4")
    prompt = CONVERSATIONS["zh_single_system"][:-1]
    ids = encode_generation_prompt(tok, prompt)
    want = jinja2.Template(BUILTIN_TEMPLATES["glm4"]).render(messages=prompt, add_generation_prompt=True)
    assert tok.decode(ids) == want
    assert ids[:2] == [tok.token_id("[gMASK]"), tok.token_id("<sop>")]
    assert ids[-1] == tok.token_id("<|assistant|>")


def test_row_formats_normalise_to_the_same_messages():
    msgs = CONVERSATIONS["mixed_multi_turn"]
    sharegpt = {
        "system": msgs[0]["content"],
        "conversations": [
            {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in msgs[1:]
        ],
        "id": 7,
    }
    swift = {
        "system": msgs[0]["content"],
        "history": [[msgs[1]["content"], msgs[2]["content"]], [msgs[3]["content"], msgs[4]["content"]]],
        "query": msgs[5]["content"],
        "response": msgs[6]["content"],
    }
    openai = {"messages": msgs, "length": 300, "response_length": 1200}
    assert normalize_row(sharegpt) == (msgs, {"id": 7})
    assert normalize_row(swift) == (msgs, {})
    assert normalize_row(openai) == (msgs, {"length": 300, "response_length": 1200})


def _llama_merging_across_the_reply_start():
    """A stand-in Llama-3 vocabulary (the bytes, Llama-3's pre-tokenisation and special tokens) with one merge,
    "]R", that joins the end of "[/INST]" to a reply starting with "R" when the two are tokenized together."""
    from test_data_template import LLAMA3_PAT
    from tokenizers import AddedToken

    from engine.data.tokenizer import LLAMA3_SPECIAL_TOKENS, HFTokenizer, bpe_from_ranks

    ranks = {bytes([b]): b for b in range(256)} | {b"]R": 256}
    bpe = bpe_from_ranks(ranks, LLAMA3_PAT)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    return HFTokenizer(bpe, name="llama-stand-in", config={"bos_token": "<|begin_of_text|>"})


def test_longwriter_reproduces_thudm_train_tokenization():
    """THUDM/LongWriter train/pre_tokenize_glm4.py and pre_tokenize_llama3.py, rebuilt from their code."""
    msgs = CONVERSATIONS["mixed_multi_turn"]
    glm = load_tokenizer("debug-glm4", template="longwriter")
    assert glm.template == "longwriter_glm4"
    ((ids, mask),) = encode_conversations(glm, [msgs])
    # THUDM: [gMASK]<sop>, then per message <|role|> + tokens(metadata + "\n" + content), then EOS; labels on
    # each reply's "\n" + content and the token after it (the next role token, EOS after the last reply)
    want, labels = [glm.token_id("[gMASK]"), glm.token_id("<sop>")], []
    for m in msgs:
        start = len(want)
        want += [glm.token_id(f"<|{m['role']}|>"), *glm.encode("\n" + m["content"])]
        if m["role"] == "assistant":
            labels += list(range(start + 1, len(want) + 1))
    want.append(glm.token_id("<|endoftext|>"))
    assert ids.tolist() == want and mask.nonzero()[0].tolist() == labels
    llama = _llama_merging_across_the_reply_start()
    llama.set_chat_template("longwriter")
    assert llama.template == "longwriter_llama"
    # the boundary is exercised: "[/INST]" + "Red" tokenized as one text merges "]R"
    assert llama.encode("[/INST]Red") != llama.encode("[/INST]") + llama.encode("Red")
    ((ids, mask),) = encode_conversations(llama, [msgs])
    # THUDM: BOS, "<<SYS>>\n{s}\n<</SYS>>\n\n", "[INST]{q}[/INST]", the reply, each tokenized alone, EOS after
    # the reply (the 8b model's data are single-turn; here every reply ends with it)
    want, labels = [llama.token_id("<|begin_of_text|>")], []
    for m in msgs:
        if m["role"] == "system":
            want += llama.encode(f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n")
        elif m["role"] == "user":
            want += llama.encode(f"[INST]{m['content']}[/INST]")
        else:
            start = len(want)
            want += [*llama.encode(m["content"]), llama.token_id("<|end_of_text|>")]
            labels += list(range(start, len(want)))
    assert ids.tolist() == want and mask.nonzero()[0].tolist() == labels
