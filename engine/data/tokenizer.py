"""Tokenizers behind one small interface.

Backends: a HF `tokenizer.json` (via the `tokenizers` library), GLM-4's tiktoken `tokenizer.model`
(glm-4-9b-chat format: one "base64token rank" per line), a sentencepiece model, and two built-in
byte-level debug tokenizers ("debug-qwen2", "debug-glm4") that need no download.

`Tokenizer.encode` never turns special-token text into special ids: a user who writes "<|im_end|>" in a
message gets the bytes of that string, not an end-of-turn. Templates insert special ids explicitly
through `token_id`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from functools import cached_property

CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# GLM-4's special tokens in id order; their ids start right after the BPE ranks
# (151329 = <|endoftext|> for glm-4-9b-chat, whose tokenizer.model holds 151329 ranks).
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# The cl100k-style pre-tokenisation regex GLM-4 passes to tiktoken.
GLM4_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-Instruct's ChatML template (default system prompt when the conversation has none).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# GLM-4 chat template without tools/metadata: "<|role|>\ncontent" after "[gMASK]<sop>".
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEBUG_FLAVOURS = {"debug-qwen2": "chatml", "debug-glm4": "glm4"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by ByteLevel BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _detect_template(vocab: dict[str, int] | Sequence[str]) -> str:
    if "[gMASK]" in vocab and "<|assistant|>" in vocab:
        return "glm4"
    return "chatml"


def _eos_for_template(template: str, token_id, extra: Sequence[int] = ()) -> tuple[int, ...]:
    if template == "chatml":
        names = ("<|im_end|>", "<|endoftext|>")
    else:  # GLM-4 ends a reply with the next role token
        names = ("<|endoftext|>", "<|user|>", "<|observation|>")
    ids: list[int] = []
    for name in names:
        try:
            ids.append(token_id(name))
        except KeyError:
            pass
    for i in extra:
        if i not in ids:
            ids.append(i)
    return tuple(ids)


class Tokenizer:
    """Common interface; subclasses implement `_encode`, `_encode_batch`, `decode`, `_special`."""

    template: str
    name: str

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode_batch(list(texts))

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def token_id(self, token: str) -> int:
        """Id of a special token (KeyError if the vocabulary lacks it)."""
        try:
            return self._special[token]
        except KeyError:
            raise KeyError(f"tokenizer {self.name!r} has no special token {token!r}") from None

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def pad_token_id(self) -> int:
        return self.eos_token_ids[0]

    @cached_property
    def fingerprint(self) -> str:
        """Stable hash of the vocabulary files and template (cache key for token lengths)."""
        h = hashlib.sha256(f"{type(self).__name__}|{self.template}|".encode())
        self._hash_into(h)
        return h.hexdigest()[:24]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, template={self.template!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json); also the backend of the debug flavours."""

    def __init__(self, tok, *, template: str | None, name: str, config: dict | None = None, extra_eos=()):
        self._tok = tok
        # Never match special-token strings inside user text.
        tok.encode_special_tokens = True
        self._special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.template = template or _detect_template(tok.get_vocab(with_added_tokens=True))
        self.name = name
        self._config = dict(config or {})
        cfg_eos = self._config.get("eos_token")
        if isinstance(cfg_eos, dict):
            cfg_eos = cfg_eos.get("content")
        extra = list(extra_eos)
        if isinstance(cfg_eos, str) and tok.token_to_id(cfg_eos) is not None:
            extra.insert(0, tok.token_to_id(cfg_eos))
        self.eos_token_ids = _eos_for_template(self.template, self.token_id, extra)

    def __setstate__(self, state):
        # The Rust tokenizer pickles through its JSON form, which drops this runtime flag.
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _hash_into(self, h) -> None:
        h.update(self._tok.to_str().encode())

    def save_pretrained(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self._tok.encode_special_tokens = False  # HF semantics in the saved file: parse specials
        try:
            self._tok.save(os.path.join(out_dir, "tokenizer.json"))
        finally:
            self._tok.encode_special_tokens = True
        _write_hf_config(out_dir, self, tokenizer_class="PreTrainedTokenizerFast", base=self._config)


class TiktokenTokenizer(Tokenizer):
    """GLM-4's `tokenizer.model`: tiktoken BPE ranks, special tokens numbered after the last rank."""

    def __init__(self, path: str, *, name: str | None = None):
        import tiktoken

        ranks: dict[bytes, int] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    tok_b64, rank = line.split()
                    ranks[base64.b64decode(tok_b64)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: not a 'base64token rank' line: {e}") from None
        n = len(ranks)
        self._special = {t: n + i for i, t in enumerate(GLM4_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            name=f"glm4:{os.path.basename(path)}",
            pat_str=GLM4_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self._special,
        )
        self._path = path
        self._ranks = ranks
        self.template = "glm4"
        self.name = name or path
        self.eos_token_ids = _eos_for_template("glm4", self.token_id)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def _encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def _hash_into(self, h) -> None:
        with open(self._path, "rb") as f:
            h.update(f.read())

    def __getstate__(self):  # tiktoken objects do not pickle; reload in the worker
        return {"path": self._path, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["path"], name=state["name"])

    def to_hf(self):
        """The same tokenizer as a `tokenizers` byte-level BPE (what glm-4-9b-chat-hf ships)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RustTokenizer

        b2u = bytes_to_unicode()

        def as_str(b: bytes) -> str:
            return "".join(b2u[x] for x in b)

        # Merges in the order tiktoken applies them: by the rank of the merged token.
        merges = []
        for token, rank in self._ranks.items():
            if len(token) < 2:
                continue
            pairs = [
                (token[:k], token[k:])
                for k in range(1, len(token))
                if token[:k] in self._ranks and token[k:] in self._ranks
            ]
            pairs.sort(key=lambda p: (self._ranks[p[0]], self._ranks[p[1]]))
            merges += [(rank, a, b) for a, b in pairs]
        merges.sort(key=lambda m: m[0])
        vocab = {as_str(t): r for t, r in self._ranks.items()}
        bpe = models.BPE(
            vocab=vocab, merges=[(as_str(a), as_str(b)) for _, a, b in merges], ignore_merges=True
        )
        tok = RustTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(GLM4_PAT_STR), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIAL_TOKENS])
        return tok

    def save_pretrained(self, out_dir: str) -> None:
        # tokenizer.model as THUDM/glm-4-9b-chat ships it, plus an equivalent tokenizer.json that
        # transformers' AutoTokenizer loads without remote code.
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(self._path, os.path.join(out_dir, "tokenizer.model"))
        self.to_hf().save(os.path.join(out_dir, "tokenizer.json"))
        _write_hf_config(out_dir, self, tokenizer_class="PreTrainedTokenizerFast", base={})


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str, *, name: str | None = None, template: str | None = None):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=path)
        self._path = path
        pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        # Control and user-defined pieces that look like template tokens act as special tokens.
        self._special = {
            p: i
            for i, p in enumerate(pieces)
            if self._sp.is_control(i) or p in CHATML_SPECIAL_TOKENS or p in GLM4_SPECIAL_TOKENS
        }
        self.template = template or _detect_template(self._special)
        self.name = name or path
        extra = [self._sp.eos_id()] if self._sp.eos_id() >= 0 else []
        self.eos_token_ids = _eos_for_template(self.template, self.token_id, extra)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        # sentencepiece drops control pieces on decode; render specials explicitly.
        inv = {i: t for t, i in self._special.items()}
        out, run = [], []
        for i in ids:
            if i in inv:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(inv[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def _hash_into(self, h) -> None:
        with open(self._path, "rb") as f:
            h.update(f.read())

    def __getstate__(self):
        return {"path": self._path, "name": self.name, "template": self.template}

    def __setstate__(self, state):
        self.__init__(state["path"], name=state["name"], template=state["template"])

    def save_pretrained(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(self._path, os.path.join(out_dir, "tokenizer.model"))
        _write_hf_config(out_dir, self, tokenizer_class="LlamaTokenizer", base={})


def _write_hf_config(out_dir: str, tok: Tokenizer, *, tokenizer_class: str, base: dict) -> None:
    eos = tok.decode([tok.eos_token_ids[0]])
    cfg = {k: v for k, v in base.items() if k not in ("added_tokens_decoder",)}
    cfg.update(
        tokenizer_class=cfg.get("tokenizer_class", tokenizer_class),
        eos_token=eos,
        pad_token=cfg.get("pad_token") or eos,
        chat_template=cfg.get("chat_template")
        or (QWEN2_CHAT_TEMPLATE if tok.template == "chatml" else GLM4_CHAT_TEMPLATE),
        clean_up_tokenization_spaces=False,
        model_max_length=cfg.get("model_max_length", 131072),
    )
    if tok.template == "glm4":
        cfg.setdefault("padding_side", "left")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": eos, "pad_token": cfg["pad_token"]}, f, ensure_ascii=False, indent=2)


def build_debug_tokenizer(template: str, name: str) -> HFTokenizer:
    """Byte-level BPE with no merges: ids 0..255 are the bytes, then the template's special tokens."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = CHATML_SPECIAL_TOKENS if template == "chatml" else GLM4_SPECIAL_TOKENS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return HFTokenizer(tok, template=template, name=name)


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\r?\n")


def _is_tiktoken_file(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return bool(_TIKTOKEN_LINE.match(head))


def load_tokenizer(path_or_flavour: str) -> Tokenizer:
    """Load a tokenizer from a flavour name, a model directory or a tokenizer file."""
    if path_or_flavour in DEBUG_FLAVOURS:
        return build_debug_tokenizer(DEBUG_FLAVOURS[path_or_flavour], path_or_flavour)
    path = os.fspath(path_or_flavour)
    if os.path.isdir(path):
        for fname in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(path, fname)):
                return _load_file(os.path.join(path, fname), config_dir=path)
        raise ValueError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if os.path.isfile(path):
        return _load_file(path, config_dir=os.path.dirname(path))
    raise ValueError(
        f"unknown tokenizer {path_or_flavour!r}: not a flavour ({', '.join(DEBUG_FLAVOURS)}) nor an existing path"
    )


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_file(path: str, *, config_dir: str) -> Tokenizer:
    if path.endswith(".json"):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        tok = RustTokenizer.from_file(path)
        config = _read_json(os.path.join(config_dir, "tokenizer_config.json"))
        # Special tokens declared only in tokenizer_config.json are added on top.
        missing = [
            AddedToken(spec["content"], special=spec.get("special", True), normalized=False)
            for _, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
            if tok.token_to_id(spec["content"]) is None
        ]
        if missing:
            tok.add_special_tokens(missing)
        gen = _read_json(os.path.join(config_dir, "generation_config.json")).get("eos_token_id", [])
        extra = [gen] if isinstance(gen, int) else list(gen)
        return HFTokenizer(tok, template=None, name=path, config=config, extra_eos=extra)
    if _is_tiktoken_file(path):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)
