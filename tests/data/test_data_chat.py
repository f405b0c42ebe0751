"""Label masks of the ChatML (Qwen2) and GLM-4 templates, token by token against the template text."""

import pytest

from engine.data import encode_generation_prompt, load_tokenizer
from engine.data.chat import aligned_labels, encode_conversations, normalize_row
from engine.data.tokenizer import GLM4_CHAT_TEMPLATE

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
    if template == "chatml":
        return [r + "<|im_end|>" for r in replies]
    return ["\n" + r + "<|user|>" for r in replies]


@pytest.fixture(scope="module", params=["debug-qwen2", "debug-glm4", "glm4-tiktoken"])
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
    text = tok.decode(ids.tolist())
    if tok.template == "chatml":
        sys = (
            ""
            if messages[0]["role"] == "system"
            else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        )
        rendered = sys + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    else:
        rendered = "[gMASK]<sop>" + "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages) + "<|user|>"
    assert text == rendered
    # Special tokens inside user text stay text.
    n_special = sum(1 for i in ids.tolist() if i in set(tok.special_tokens.values()))
    per_msg = 2 if tok.template == "chatml" else 1
    n_msgs = len(messages) + (tok.template == "chatml" and messages[0]["role"] != "system")
    assert n_special == per_msg * n_msgs + (3 if tok.template == "glm4" else 0)


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
    want = jinja2.Template(GLM4_CHAT_TEMPLATE).render(messages=prompt, add_generation_prompt=True)
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
