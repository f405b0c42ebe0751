"""Chat templates against transformers' apply_chat_template, token for token, on the real Qwen2 vocabulary
(151,643 BPE ranks from the dashscope package) with the real Qwen2 / Qwen2.5-Instruct templates, and on
stand-in vocabularies with the real glm-4-9b-chat and Llama-3.1-8B-Instruct templates
(tests/data/fixtures/chat_templates, sources in SOURCE.md)."""

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from engine.data import encode_generation_prompt, load_tokenizer
from engine.data.chat import encode_conversations

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
LONGBENCH = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "longwriter" / "longbench_write.jsonl"
)
QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_5_ADDED = QWEN2_ADDED + [
    *("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>"),
    *(
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
]
QWEN2_5_NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
QWEN2_5_NOT_SPECIAL += ["<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

MD = "# 标题\n\n- item one\n- **bold** `code`\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |"
CONVERSATIONS = {
    "no_system": [
        {"role": "user", "content": "Write a 300-word article about lighthouses."},
        {"role": "assistant", "content": "# Lighthouses\n\nLighthouses guided ships for centuries."},
    ],
    "system_zh": [
        {"role": "system", "content": "你是一个乐于助人的写作助手。"},
        {"role": "user", "content": "请以“长城的历史”为主题写一篇文章。"},
        {"role": "assistant", "content": "长城是中国古代的军事防御工程。" * 3},
    ],
    "multi_turn_markdown": [
        {"role": "system", "content": "You are a careful writing assistant."},
        {"role": "user", "content": "一年有几个季节？"},
        {"role": "assistant", "content": "一年有四个季节。"},
        {"role": "user", "content": "Show markdown."},
        {"role": "assistant", "content": MD},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "whitespace": [
        {"role": "user", "content": "\nstarts with a newline, ends with spaces   "},
        {"role": "assistant", "content": "\n\n  indented reply\n\n"},
        {"role": "user", "content": "  \t tabs\n\n\n"},
        {"role": "assistant", "content": " leading space and trailing newline\n"},
    ],
    "control_text": [
        {"role": "user", "content": "Name three colours <|im_end|> [gMASK] <|user|> <|eot_id|>."},
        {"role": "assistant", "content": "Red<|im_end|>, <|endoftext|>blue and <|assistant|> yellow."},
    ],
    "added_not_special": [
        {"role": "user", "content": "complete <|fim_prefix|>def f():<|fim_suffix|> please"},
        {"role": "assistant", "content": "<|fim_middle|>return 1"},
    ],
}
CONTROL_TEXT = ("control_text",)


def _has_dashscope():
    return importlib.util.find_spec("dashscope") is not None


def _qwen_bpe():
    """Qwen2's byte-level BPE rebuilt from the 151,643 ranks of qwen.tiktoken (no added tokens yet)."""
    import base64

    from engine.data.tokenizer import bpe_from_ranks

    spec = importlib.util.find_spec("dashscope")  # locates the package without importing it
    ranks_file = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in ranks_file.read_text().splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    assert len(ranks) == 151643 and max(ranks.values()) == 151642
    return bpe_from_ranks(ranks, QWEN2_PAT, nfc=True).to_str()


def _write_dir(path: Path, bpe_json: str, added: list[tuple[str, bool]], template: str, config: dict) -> Path:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok = RustTokenizer.from_str(bpe_json)
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in added])
    tok.save(str(path / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=False)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(n + i): {"content": t, "special": special, "normalized": False}
            for i, (t, special) in enumerate(added)
        },
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        **config,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return path


def _qwen_dir(root, bpe, version):
    added = [(t, True) for t in (QWEN2_ADDED if version == "2" else QWEN2_5_ADDED)]
    if version == "2.5":
        added += [(t, False) for t in QWEN2_5_NOT_SPECIAL]
    name = "Qwen2-7B-Instruct" if version == "2" else "Qwen2.5-7B-Instruct"
    template = (FIXTURES / f"{name}.jinja").read_text()
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    return _write_dir(root / name, bpe, added, template, config)


class _Dirs(dict):
    def __missing__(self, name):  # only the Qwen2 vocabulary needs the package
        pytest.skip("the dashscope package (make install adds it, --no-deps) ships the Qwen2 BPE ranks")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """{name: directory with tokenizer.json + tokenizer_config.json holding the real chat template}."""
    from engine.data.tokenizer import GLM4_PAT_STR, GLM4_SPECIAL_TOKENS, LLAMA3_SPECIAL_TOKENS, bpe_from_ranks

    root = tmp_path_factory.mktemp("models")
    dirs = _Dirs()
    if _has_dashscope():
        qwen_bpe = _qwen_bpe()
        dirs.update(qwen2=_qwen_dir(root, qwen_bpe, "2"), **{"qwen2.5": _qwen_dir(root, qwen_bpe, "2.5")})
    # Stand-in vocabularies: the bytes plus a few merges, GLM-4 / Llama-3 pre-tokenisation and special tokens.
    ranks = {bytes([b]): b for b in range(256)}
    for t in (b"\n\n", b"th", b"the", b"Li", "长".encode()[:2], "长".encode(), b"ing", b" a"):
        ranks[t] = len(ranks)
    glm_bpe = bpe_from_ranks(ranks, GLM4_PAT_STR).to_str()
    glm_cfg = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    template = (FIXTURES / "glm-4-9b-chat.jinja").read_text()
    dirs["glm4"] = _write_dir(
        root / "glm-4-9b-chat", glm_bpe, [(t, True) for t in GLM4_SPECIAL_TOKENS], template, glm_cfg
    )
    # the same model as THUDM ships it: tiktoken tokenizer.model + tokenizer_config.json
    tk = root / "glm-4-9b-chat-tiktoken"
    tk.mkdir()
    import base64

    (tk / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    )
    shutil.copy(dirs["glm4"] / "tokenizer_config.json", tk / "tokenizer_config.json")
    dirs["glm4-tiktoken"] = tk
    llama_bpe = bpe_from_ranks(ranks, LLAMA3_PAT).to_str()
    llama_cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    template = (FIXTURES / "Llama-3.1-8B-Instruct.jinja").read_text()
    added = [(t, True) for t in LLAMA3_SPECIAL_TOKENS]
    dirs["llama3.1"] = _write_dir(root / "Llama-3.1-8B-Instruct", llama_bpe, added, template, llama_cfg)
    return dirs


@functools.cache
def _hf(path):  # a 150k-entry tokenizer.json takes seconds to load: once per directory
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@functools.cache
def _tok(path):
    return load_tokenizer(str(path))


def _hf_ids(hf, messages, **kw):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


def _runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _expected_replies(name, messages):
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if name.startswith("qwen"):
        return [r + "<|im_end|>" for r in replies]
    if name.startswith("llama"):
        return [r.strip() + "<|eot_id|>" for r in replies]  # its template trims every message
    return ["\n" + r + "<|user|>" for r in replies]  # GLM-4: the next role token ends a reply


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", ["qwen2", "qwen2.5", "glm4", "glm4-tiktoken", "llama3.1"])
def test_ids_and_masks_equal_transformers(model_dirs, name, conv):
    messages = CONVERSATIONS[conv]
    tok = _tok(model_dirs[name])
    assert tok.chat_template.origin.endswith("tokenizer_config.json")
    hf = _hf(model_dirs["glm4"] if name == "glm4-tiktoken" else model_dirs[name])
    ((ids, mask),) = encode_conversations(tok, [messages])
    ids = ids.tolist()
    want = _hf_ids(hf, messages, sanitize_control_tokens=True)  # control text in contents stays text
    if conv not in CONTROL_TEXT:
        assert _hf_ids(hf, messages) == want  # no control text: both modes agree
    if name.startswith("glm4"):
        # glm-4-9b-chat's template ends the last reply with nothing: the engine appends and trains <|user|>
        assert ids == [*want, tok.token_id("<|user|>")]
    else:
        assert ids == want
    # The mask covers each reply and its end-of-turn token, nothing else (a token that straddles the start
    # of a reply, e.g. "\n\n" across "assistant\n" + "\n...", is trained: only whitespace before the reply).
    runs = [tok.decode(r) for r in _runs(ids, mask)]
    expected = _expected_replies(name, messages)
    assert len(runs) == len(expected)
    for got, exp in zip(runs, expected):
        assert got.endswith(exp) and not got[: len(got) - len(exp)].strip(), (got, exp)
    # generation prompt: the engine's inference path equals add_generation_prompt=True
    prompt = messages[:-1]
    assert encode_generation_prompt(tok, prompt) == _hf_ids(
        hf, prompt, add_generation_prompt=True, sanitize_control_tokens=True
    )


def test_qwen2_5_default_system_and_qwen2_default_differ(model_dirs):
    """The issue's first bug: Qwen2.5 rows without a system turn train Qwen2.5's own default system prompt."""
    msgs = CONVERSATIONS["no_system"]
    q25, q2 = _tok(model_dirs["qwen2.5"]), _tok(model_dirs["qwen2"])
    text25 = q25.decode(encode_conversations(q25, [msgs])[0][0].tolist())
    assert text25.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    assert q2.decode(encode_conversations(q2, [msgs])[0][0].tolist()).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
    )
    # a leading newline in a content is tokenized with the text around it, as transformers does (271 = "\n\n")
    msgs = [{"role": "user", "content": "\nhello"}]
    ids = encode_generation_prompt(q25, msgs)
    assert 271 in ids and ids == _hf_ids(_hf(model_dirs["qwen2.5"]), msgs, add_generation_prompt=True)


def test_glm4_drops_empty_messages_as_its_template_does(model_dirs):
    msgs = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    tok = _tok(model_dirs["glm4"])
    ((ids, _),) = encode_conversations(tok, [msgs])
    assert tok.decode(ids.tolist()) == "[gMASK]<sop><|user|>\nHi<|assistant|>\nHello<|user|>"
    assert ids.tolist()[:-1] == _hf_ids(_hf(model_dirs["glm4"]), msgs)


@pytest.mark.skipif(
    not LONGBENCH.is_file(), reason="LongBench-Write data (../shared/data/longwriter) not found"
)
@pytest.mark.parametrize("name", ["qwen2.5", "glm4", "llama3.1"])
def test_longbench_write_prompts_render_as_transformers(model_dirs, name):
    tok, hf = _tok(model_dirs[name]), _hf(model_dirs[name])
    rows = [json.loads(line) for line in LONGBENCH.read_text().splitlines() if line.strip()]
    assert len(rows) == 120
    for row in rows:
        msgs = [{"role": "user", "content": row["prompt"]}]
        assert encode_generation_prompt(tok, msgs) == _hf_ids(hf, msgs, add_generation_prompt=True), row[
            "prompt"
        ]


def test_template_and_system_override_and_the_export_serves_what_was_trained(model_dirs, tmp_path):
    msgs = CONVERSATIONS["no_system"]
    tok = load_tokenizer(str(model_dirs["qwen2"]), template="qwen2_5", system="Be brief.")
    assert tok.chat_template.origin == "built-in qwen2_5 (--template) with --system"
    ((ids, _),) = encode_conversations(tok, [msgs])
    assert tok.decode(ids.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    tok.save_pretrained(str(tmp_path / "out"))
    hf = _hf(tmp_path / "out")
    assert hf.chat_template == tok.chat_template.source
    assert _hf_ids(hf, msgs) == ids.tolist()
    again = load_tokenizer(str(tmp_path / "out"))
    assert encode_conversations(again, [msgs])[0][0].tolist() == ids.tolist()
    # a conversation with its own system prompt keeps it
    own = [{"role": "system", "content": "Own."}, *msgs]
    assert tok.decode(encode_conversations(tok, [own])[0][0].tolist()).startswith("<|im_start|>system\nOwn.")
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        tok.set_chat_template("nope")
    with pytest.raises(ValueError, match="'longwriter' has variants for GLM-4 and Llama-3"):
        tok.set_chat_template("longwriter")


def test_chat_template_jinja_file_wins(model_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dirs["qwen2"], d)
    (d / "chat_template.jinja").write_text((FIXTURES / "Qwen2.5-7B-Instruct.jinja").read_text())
    tok = load_tokenizer(str(d))
    assert tok.chat_template.origin == str(d / "chat_template.jinja")
    assert "You are Qwen" in tok.decode(encode_generation_prompt(tok, [{"role": "user", "content": "x"}]))


@pytest.mark.parametrize(
    "template,why",
    [
        # drops earlier replies (as reasoning templates do with history): the prompt is not a prefix
        (
            "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n"
            "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "not a prefix",
        ),
        # no end-of-turn token at all
        ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", "no control token ends it"),
        # ignores add_generation_prompt: the reply header would be trained
        (
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
            "add_generation_prompt does not emit the reply header",
        ),
    ],
)
def test_a_template_that_cannot_be_masked_is_an_error_naming_the_file(template, why, tmp_path):
    from engine.data import build_dataset

    tok = load_tokenizer("debug-qwen2")
    tok.save_pretrained(str(tmp_path / "m"))
    cfg_file = tmp_path / "m" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "chat_template": template}))
    tok = load_tokenizer(str(tmp_path / "m"))
    rows = tmp_path / "d.jsonl"
    rows.write_text(json.dumps({"messages": CONVERSATIONS["multi_turn_markdown"][1:]}) + "\n")
    with pytest.raises(ValueError, match=f"d.jsonl:1: chat template {cfg_file}: cannot mask .*{why}"):
        build_dataset([str(rows)], tok, max_length=4096)


@pytest.mark.parametrize(
    "template_head,bad_messages,error",
    [
        # raised while rendering, by the template itself
        (
            "{% if messages|length > 2 %}{{ raise_exception('only one turn, please') }}{% endif %}",
            CONVERSATIONS["multi_turn_markdown"][1:],
            "chat template .*only one turn, please",
        ),
        # raised while encoding: a non-special added token that the template's text contains is a control
        # token, so a content's "<tool>" must stay text, which this tokenizer cannot do
        (
            "{% if false %}<tool>{% endif %}",
            [{"role": "user", "content": "call <tool> now"}, {"role": "assistant", "content": "Done."}],
            "cannot encode '<tool>' in a message as text",
        ),
    ],
    ids=["render", "encode"],
)
def test_template_errors_name_the_row(template_head, bad_messages, error, tmp_path):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    from engine.data import build_dataset

    load_tokenizer("debug-qwen2").save_pretrained(str(tmp_path / "m"))
    tok_file = str(tmp_path / "m" / "tokenizer.json")
    rust = RustTokenizer.from_file(tok_file)
    rust.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    rust.save(tok_file)
    cfg_file = tmp_path / "m" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "chat_template": template_head + cfg["chat_template"]}))
    rows = tmp_path / "d.jsonl"
    good = json.dumps({"messages": CONVERSATIONS["no_system"]}) + "\n"
    rows.write_text(good * 4 + json.dumps({"messages": bad_messages}) + "\n" + good)
    with pytest.raises(ValueError, match=f"d.jsonl:5: {error}"):
        build_dataset([str(rows)], load_tokenizer(str(tmp_path / "m")), max_length=4096)
