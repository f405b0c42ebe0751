"""Chat templates: a checkpoint's own jinja template, or a built-in one, -> token ids and a trainable mask.

Rendering is transformers' `apply_chat_template`: a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, the `raise_exception` / `strftime_now` globals, its `tojson` filter, the tokenizer's special
tokens as variables (bos_token, eos_token, ...) and `add_generation_prompt`. The whole rendered text is
tokenized once, so the ids equal `apply_chat_template(messages, tokenize=True)`, except that control-token
text inside message contents stays text: the ids equal `apply_chat_template(..., sanitize_control_tokens=True)`,
whose rules this follows (control tokens = the special tokens plus the added tokens the template's own text
contains; a content's control tokens are encoded as text on their own; other added tokens act as tokens).

What is trained, per assistant turn i (found by rendering, never by parsing a template):
  P = render(messages[:i], add_generation_prompt=True)  must be a prefix of the whole rendering R;
  the trained text starts at len(P) (what the model generates after the generation prompt: GLM-4's "\n"
  before the reply included) and ends with the first control token after the reply's content: the template's
  end-of-turn (<|im_end|>, <|eot_id|>, THUDM's <|endoftext|>) or, for templates that emit none (GLM-4), the
  token that opens the next turn; after the last reply such a template gets that token appended (GLM-4:
  <|user|>, found by rendering one more user turn), the only place where the ids go beyond transformers'.
A template where this cannot be established (a prompt that is not a prefix of the conversation, a reply not
found, a header that add_generation_prompt does not emit, no end-of-turn) is an error naming its file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

import numpy as np

# Private-use code points around control tokens found in message contents (their text stays text).
MARK_START, MARK_END = "\U000f0000", "\U000f0001"

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _chatml(default_system: str | None) -> str:
    head = ""
    if default_system is not None:
        head = (
            "{%- if not messages or messages[0]['role'] != 'system' %}"
            "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{%- endif %}"
        )
    return (
        head + "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


# Built-in templates by ms-swift template name (their renderings without tools equal the model's own).
BUILTIN_TEMPLATES: dict[str, str] = {
    # Qwen2-Instruct's own template, verbatim
    "qwen": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "qwen2_5": _chatml(QWEN2_5_DEFAULT_SYSTEM),
    "chatml": _chatml(None),
    # glm-4-9b-chat without tools: a message with empty content is dropped, as its template does
    "glm4": (
        "[gMASK]<sop>{% for message in messages %}{% if message['content'] %}<|{{ message['role'] }}|>\n"
        "{{ message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
    "llama3": (
        "{{- '<|begin_of_text|>' }}{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + "
        "'<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    # THUDM/LongWriter train/pre_tokenize_glm4.py: build_single_message per turn, <|endoftext|> at the end
    "longwriter_glm4": (
        "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>"
        "{% elif messages and messages[-1]['role'] == 'assistant' %}<|endoftext|>{% endif %}"
    ),
    # THUDM/LongWriter train/pre_tokenize_llama3.py (LongWriter-llama3.1-8b): BOS, <<SYS>>, [INST]q[/INST],
    # the reply, <|end_of_text|>; THUDM tokenizes every segment alone (split_reply below)
    "longwriter_llama": (
        "{{- '<|begin_of_text|>' }}{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{- '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
        "{%- elif message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
        "{%- else %}{{- message['content'] + '<|end_of_text|>' }}{%- endif %}{%- endfor %}"
    ),
}
# `longwriter` picks THUDM's variant for the vocabulary (tokenizer.family).
LONGWRITER = {"glm4": "longwriter_glm4", "llama3": "longwriter_llama"}
DEFAULT_FOR_FAMILY = {"chatml": "qwen", "glm4": "glm4", "llama3": "llama3"}


class ChatTemplateError(ValueError):
    """A conversation the template cannot render or mask; `index` is its position in the batch."""

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


class _Generation:  # `{% generation %}...{% endgeneration %}` (transformers' assistant tracker): render the body
    pass


def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, env.from_string(source)


@dataclass
class ChatTemplate:
    """A jinja chat template and where it came from. split_reply: tokenize each reply apart from its prompt
    (THUDM's LongWriter-llama tokenization); otherwise the rendering is tokenized as one text."""

    source: str
    name: str  # a built-in name, or the file it was read from
    origin: str  # for the log: "built-in qwen (default for this vocabulary)", ".../tokenizer_config.json"
    split_reply: bool = False
    _compiled: tuple | None = field(default=None, repr=False, compare=False)

    def __getstate__(self):  # jinja templates do not pickle; DataLoader workers recompile
        return {**self.__dict__, "_compiled": None}

    @property
    def compiled(self):
        if self._compiled is None:
            self._compiled = _compile(self.source)
        return self._compiled

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.split_reply}|{self.source}".encode()).hexdigest()[:16]

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False, variables=None) -> str:
        import jinja2

        try:
            return self.compiled[1].render(
                messages=list(messages), tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **(variables or {}),
            )  # fmt: skip
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.origin}: {type(e).__name__}: {e}") from None

    @cached_property
    def literal_text(self) -> str:
        """Every text block and string constant of the template, NUL-joined (transformers' rule for which
        added tokens are control tokens); cached: parsing the template is most of a short sample's encoding."""
        import jinja2

        env = self.compiled[0]
        ast = env.parse(self.source)
        parts = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
        parts |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
        return "\0".join(sorted(parts))

    def with_system(self, system: str) -> ChatTemplate:
        """The same template with `system` as the system prompt of conversations that have none; written
        into the template text so the export serves what was trained."""
        lit = json.dumps(system)  # a valid jinja string literal (\\uXXXX escapes decode the same way)
        head = (
            "{%- if not messages or messages[0]['role'] != 'system' %}"
            "{%- set messages = [{'role': 'system', 'content': " + lit + "}] + messages %}{%- endif %}"
        )
        return ChatTemplate(head + self.source, self.name, f"{self.origin} with --system", self.split_reply)


def builtin_template(name: str, family: str, reason: str) -> ChatTemplate:
    if name == "longwriter":
        if family not in LONGWRITER:
            raise ValueError(
                f"template 'longwriter' has variants for GLM-4 and Llama-3 vocabularies, not for {family!r} "
                f"(choose one of {sorted(BUILTIN_TEMPLATES)})"
            )
        name = LONGWRITER[family]
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(
            f"unknown template {name!r}; built-in: {', '.join([*BUILTIN_TEMPLATES, 'longwriter'])}"
        )
    return ChatTemplate(
        BUILTIN_TEMPLATES[name], name, f"built-in {name} ({reason})", name == "longwriter_llama"
    )


# ------------------------------------------------------------------------------------------- encoding


class _Controls:
    """The control tokens of one (tokenizer, template) pair and the regexes that find them."""

    def __init__(self, tokenizer, template: ChatTemplate):
        added = tokenizer.added_tokens  # content -> (id, special)
        allowed = tokenizer.chat_control_tokens
        text = template.literal_text if allowed is None else ""
        self.ids = {
            t: i
            for t, (i, special) in added.items()
            if special or (t in allowed if allowed is not None else (t in text and not t.isspace()))
        }
        alts = "|".join(map(re.escape, sorted(self.ids, key=len, reverse=True))) or "(?!)"
        self.bare = re.compile(alts)
        # a marked content token, a lone marker (template string ops split one), or a template control token
        self.split = re.compile(f"{MARK_START}({alts}){MARK_END}|[{MARK_START}{MARK_END}]|({alts})")

    def mark(self, text: str) -> str:
        text = text.replace(MARK_START, "").replace(MARK_END, "")
        return self.bare.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", text)

    def first_bare(self, text: str, start: int):
        """The first template control token at or after `start` (content tokens are marked, so skipped)."""
        for m in self.split.finditer(text, start):
            if m.group(2) is not None:
                return m
        return None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first difference
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _reply_spans(
    template: ChatTemplate, ctl: _Controls, msgs: list[dict], variables
) -> tuple[str, list, str]:
    """(whole rendering R, trained [start, end) character spans of R, token text appended after R)."""

    def render(m, gen=False):
        return template.render(m, add_generation_prompt=gen, variables=variables)

    def fail(i: int, why: str):
        raise ChatTemplateError(
            f"chat template {template.origin}: cannot mask assistant turn messages[{i}]: {why}"
        )

    R = render(msgs)
    spans, appended = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        P, F = render(msgs[:i], gen=True), render(msgs[: i + 1])
        if not (R.startswith(P) and F.startswith(P)):
            fail(i, "the rendering up to its generation prompt is not a prefix of the whole conversation")
        c = _common_prefix(F, R)
        region = R[len(P) : c]
        reply = m["content"].strip()
        k = region.find(reply)
        if k < 0:
            fail(i, "its content does not appear after the generation prompt")
        if ctl.first_bare(region[:k], 0) is not None:
            fail(
                i,
                "a control token precedes its content: add_generation_prompt does not emit the reply header",
            )
        end_of_reply = len(P) + k + len(reply)
        tok = ctl.first_bare(R, end_of_reply)
        if tok is not None and tok.start() <= c:
            spans.append((len(P), tok.end()))
            continue
        if c < len(R) or any(x["role"] == "assistant" for x in msgs[i + 1 :]):
            fail(i, "no control token ends it (the template emits no end-of-turn token)")
        probe = render([*msgs, {"role": "user", "content": "x"}])
        nxt = ctl.first_bare(probe, len(R)) if probe.startswith(R) else None
        if nxt is None or nxt.start() != len(R):
            fail(
                i,
                "it is the last turn and the template emits no end-of-turn token after it, nor opens a next turn",
            )
        appended = nxt.group(0)
        spans.append((len(P), len(R) + len(appended)))
    return R, spans, appended


def _pieces(ctl: _Controls, text: str, cuts: Sequence[int]) -> list[tuple[int, str, int | None]]:
    """text -> [(start, piece text, control id or None)]: control tokens written by the template become
    ids, marked content tokens and the text between become text pieces (also cut at `cuts`)."""
    out, pos = [], 0

    def add_text(a: int, b: int):
        for lo, hi in zip([a, *[c for c in cuts if a < c < b]], [*[c for c in cuts if a < c < b], b]):
            if hi > lo:
                out.append((lo, text[lo:hi], None))

    for m in ctl.split.finditer(text):
        add_text(pos, m.start())
        if m.group(1) is not None:  # a control token from a content: its own text piece
            out.append((m.start(1), m.group(1), None))
        elif m.group(2) is not None:
            out.append((m.start(), m.group(2), ctl.ids[m.group(2)]))
        pos = m.end()
    add_text(pos, len(text))
    return out


def encode_chats(
    tokenizer,
    template: ChatTemplate,
    conversations: Sequence[Sequence[dict]],
    *,
    generation_prompt: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Conversations -> [(input_ids int32[T], trainable bool[T])]; all text pieces encoded in one batch.
    generation_prompt: render up to the assistant header (nothing trained), as for inference."""
    ctl = _Controls(tokenizer, template)
    variables = tokenizer.template_variables
    plans = []
    for n, conv in enumerate(conversations):
        msgs = [{**m, "content": ctl.mark(m["content"])} for m in conv]
        try:
            if generation_prompt:
                text, spans, appended = (
                    template.render(msgs, add_generation_prompt=True, variables=variables),
                    [],
                    "",
                )
            else:
                text, spans, appended = _reply_spans(template, ctl, msgs, variables)
        except ChatTemplateError as e:
            raise ChatTemplateError(str(e), n) from None
        cuts = sorted({s for s, _ in spans}) if template.split_reply else ()
        pieces = _pieces(ctl, text, cuts)
        if appended:
            pieces.append((len(text), appended, ctl.ids[appended]))
        plans.append((pieces, spans))
    texts = [p for pieces, _ in plans for _, p, tid in pieces if tid is None]
    encoded = iter(tokenizer.encode_offsets_batch(texts))
    out = []
    for n, (pieces, spans) in enumerate(plans):
        ids: list[int] = []
        starts: list[int] = []
        for start, piece, tid in pieces:
            if tid is not None:
                ids.append(tid)
                starts.append(start)
                continue
            p_ids, p_starts = next(encoded)
            if piece in ctl.ids and ctl.ids[piece] in p_ids:  # as transformers: refuse, never mis-encode
                raise ChatTemplateError(
                    f"cannot encode {piece!r} in a message as text: the tokenizer makes it a token", n
                )
            ids += p_ids
            starts += [start + s for s in p_starts]
        mask = np.zeros(len(ids), dtype=bool)
        if spans:
            st = np.asarray(starts, dtype=np.int64)
            end = np.maximum(np.append(st[1:], st[-1] + 1), st + 1)  # a token covers [start, next start)
            for a, b in spans:
                mask |= (st < b) & (end > a)
        out.append((np.asarray(ids, dtype=np.int32), mask))
    return out
