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

import numpy as np

from engine.data.template import DEFAULT_FOR_FAMILY, ChatTemplate, builtin_template

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

# Llama 3's special tokens in id order from 128000 (the debug-llama tokenizer numbers them from 256).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
FAMILY_SPECIAL_TOKENS = {
    "chatml": CHATML_SPECIAL_TOKENS,
    "glm4": GLM4_SPECIAL_TOKENS,
    "llama3": LLAMA3_SPECIAL_TOKENS,
}

DEBUG_FLAVOURS = {"debug-qwen2": "chatml", "debug-glm4": "glm4", "debug-llama": "llama3"}


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


def _detect_family(vocab: dict[str, int] | Sequence[str]) -> str:
    """The vocabulary family ("chatml" | "glm4" | "llama3"): end-of-turn ids and the default template."""
    if "[gMASK]" in vocab and "<|assistant|>" in vocab:
        return "glm4"
    if "<|begin_of_text|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    return "chatml"


_FAMILY_EOS = {
    "chatml": ("<|im_end|>", "<|endoftext|>"),
    "glm4": ("<|endoftext|>", "<|user|>", "<|observation|>"),  # GLM-4 ends a reply with the next role token
    "llama3": ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
}


def _eos_for_family(family: str, token_id, extra: Sequence[int] = ()) -> tuple[int, ...]:
    ids: list[int] = []
    for name in _FAMILY_EOS[family]:
        try:
            ids.append(token_id(name))
        except KeyError:
            pass
    for i in extra:
        if i not in ids:
            ids.append(i)
    return tuple(ids)


# tokenizer_config.json's named special tokens (transformers' special tokens map)
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


class Tokenizer:
    """Common interface; subclasses implement `_encode`, `_encode_batch`, `encode_offsets_batch`, `decode`,
    `_special` (and `added_tokens` when they have added tokens that are not special)."""

    family: str
    name: str
    chat_template: ChatTemplate
    chat_control_tokens: list[str] | None = None  # tokenizer_config.json's, else inferred from the template
    _config: dict = {}

    @property
    def template(self) -> str:
        """The chat template's name (a built-in name or the file it came from)."""
        return self.chat_template.name

    def set_chat_template(self, template: str | None = None, system: str | None = None) -> None:
        """--template NAME replaces the checkpoint's template by a built-in; --system sets the system prompt of
        conversations without one (written into the template, so the export serves what was trained)."""
        if template is not None:
            self.chat_template = builtin_template(template, self.family, "--template")
        if system is not None:
            self.chat_template = self.chat_template.with_system(system)

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
    def added_tokens(self) -> dict[str, tuple[int, bool]]:
        """content -> (id, special) of every added token (chat templates find control tokens among them)."""
        return {t: (i, True) for t, i in self._special.items()}

    @property
    def template_variables(self) -> dict[str, str]:
        """What transformers passes a chat template besides the messages: the special tokens map."""
        out = {}
        for key in NAMED_SPECIAL_TOKENS:
            text = _token_text(self._config.get(key))
            if text is not None:
                out[key] = text
        return out

    @property
    def pad_token_id(self) -> int:
        return self.eos_token_ids[0]

    @cached_property
    def _vocabulary_hash(self) -> str:  # hashing the files is the slow part: once per tokenizer
        h = hashlib.sha256(f"{type(self).__name__}|".encode())
        self._hash_into(h)
        return h.hexdigest()

    @property
    def fingerprint(self) -> str:
        """Stable hash of the vocabulary files and the current chat template, however it was set (the key
        of the token-length cache and of the dataset's fingerprint)."""
        key = f"{self._vocabulary_hash}|{self.chat_template.fingerprint}"
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, template={self.template!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json); also the backend of the debug flavours."""

    def __init__(
        self,
        tok,
        *,
        name: str,
        config: dict | None = None,
        extra_eos=(),
        chat_template: ChatTemplate | None = None,
    ):
        self._tok = tok
        # Never match special-token strings inside user text (added tokens that are not special still match,
        # as in transformers).
        tok.encode_special_tokens = True
        decoder = tok.get_added_tokens_decoder()
        self._special = {t.content: i for i, t in decoder.items() if t.special}
        self._added = {t.content: (i, bool(t.special)) for i, t in decoder.items()}
        self.family = _detect_family(tok.get_vocab(with_added_tokens=True))
        self.name = name
        self._config = dict(config or {})
        self.chat_control_tokens = self._config.get("chat_control_tokens")
        self.chat_template = chat_template or builtin_template(
            DEFAULT_FOR_FAMILY[self.family], self.family, "default for this vocabulary"
        )
        cfg_eos = _token_text(self._config.get("eos_token"))
        extra = list(extra_eos)
        if cfg_eos is not None and tok.token_to_id(cfg_eos) is not None:
            extra.insert(0, tok.token_to_id(cfg_eos))
        self.eos_token_ids = _eos_for_family(self.family, self.token_id, extra)

    @property
    def added_tokens(self) -> dict[str, tuple[int, bool]]:
        return dict(self._added)

    def encode_offsets_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """[(ids, start character of each token)] of texts encoded as text (special tokens never parsed)."""
        return [
            (e.ids, [a for a, _ in e.offsets])
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)
        ]

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


def bpe_from_ranks(ranks: dict[bytes, int], pat_str: str, *, nfc: bool = False):
    """tiktoken BPE ranks -> an equivalent `tokenizers` byte-level BPE (regex split, then ByteLevel), without
    added tokens. nfc: an NFC normalizer first, as Qwen2's tokenizer.json has."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    b2u = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    # Merges in the order tiktoken applies them: by the rank of the merged token.
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        pairs = [
            (token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks
        ]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, a, b) for a, b in pairs]
    merges.sort(key=lambda m: m[0])
    vocab = {as_str(t): r for t, r in ranks.items()}
    bpe = models.BPE(vocab=vocab, merges=[(as_str(a), as_str(b)) for _, a, b in merges], ignore_merges=True)
    tok = RustTokenizer(bpe)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class TiktokenTokenizer(Tokenizer):
    """GLM-4's `tokenizer.model`: tiktoken BPE ranks, special tokens numbered after the last rank."""

    def __init__(self, path: str, *, name: str | None = None, config: dict | None = None, chat_template=None):
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
        self.family = "glm4"
        self.name = name or path
        self._config = dict(config or {})
        self.chat_template = chat_template or builtin_template("glm4", "glm4", "default for this vocabulary")
        self.eos_token_ids = _eos_for_family("glm4", self.token_id)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def _encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def encode_offsets_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        out = []
        for ids in self._enc.encode_ordinary_batch(list(texts)):
            out.append((ids, self._enc.decode_with_offsets(ids)[1]))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def _hash_into(self, h) -> None:
        with open(self._path, "rb") as f:
            h.update(f.read())

    def __getstate__(self):  # tiktoken objects do not pickle; reload in the worker
        return {
            "path": self._path,
            "name": self.name,
            "config": self._config,
            "chat_template": self.chat_template,
        }

    def __setstate__(self, state):
        self.__init__(**state)

    def to_hf(self):
        """The same tokenizer as a `tokenizers` byte-level BPE (what glm-4-9b-chat-hf ships)."""
        from tokenizers import AddedToken

        tok = bpe_from_ranks(self._ranks, GLM4_PAT_STR)
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
    def __init__(self, path: str, *, name: str | None = None, config: dict | None = None, chat_template=None):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=path)
        self._path = path
        pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        # Control and user-defined pieces that look like template tokens act as special tokens.
        self._special = {
            p: i
            for i, p in enumerate(pieces)
            if self._sp.is_control(i) or any(p in toks for toks in FAMILY_SPECIAL_TOKENS.values())
        }
        self.family = _detect_family(self._special)
        self.name = name or path
        self._config = dict(config or {})
        self.chat_template = chat_template or builtin_template(
            DEFAULT_FOR_FAMILY[self.family], self.family, "default for this vocabulary"
        )
        extra = [self._sp.eos_id()] if self._sp.eos_id() >= 0 else []
        self.eos_token_ids = _eos_for_family(self.family, self.token_id, extra)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_offsets_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        out = []
        for text in texts:
            proto = self._sp.encode(text, out_type="immutable_proto")
            char_at = np.cumsum([0] + [len(c.encode()) for c in text])  # byte offset of each character
            starts = [int(np.searchsorted(char_at, p.begin, side="right") - 1) for p in proto.pieces]
            out.append(([p.id for p in proto.pieces], starts))
        return out

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
        return {
            "path": self._path,
            "name": self.name,
            "config": self._config,
            "chat_template": self.chat_template,
        }

    def __setstate__(self, state):
        self.__init__(**state)

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
        chat_template=tok.chat_template.source,  # the template that was trained
        clean_up_tokenization_spaces=False,
        model_max_length=cfg.get("model_max_length", 131072),
    )
    if tok.family == "glm4":
        cfg.setdefault("padding_side", "left")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": eos, "pad_token": cfg["pad_token"]}, f, ensure_ascii=False, indent=2)


def build_debug_tokenizer(family: str, name: str) -> HFTokenizer:
    """Byte-level BPE with no merges: ids 0..255 are the bytes, then the family's special tokens."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = FAMILY_SPECIAL_TOKENS[family]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    config = {"bos_token": "<|begin_of_text|>"} if family == "llama3" else {}
    return HFTokenizer(tok, name=name, config=config)


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\r?\n")


def _is_tiktoken_file(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return bool(_TIKTOKEN_LINE.match(head))


def load_tokenizer(
    path_or_flavour: str, *, template: str | None = None, system: str | None = None
) -> Tokenizer:
    """Load a tokenizer from a flavour name, a model directory or a tokenizer file, with the directory's own
    chat template (chat_template.jinja, tokenizer_config.json, chat_template.json) or the built-in default
    of its vocabulary; `template` (a built-in name) and `system` as Tokenizer.set_chat_template."""
    if path_or_flavour in DEBUG_FLAVOURS:
        tok = build_debug_tokenizer(DEBUG_FLAVOURS[path_or_flavour], path_or_flavour)
    else:
        path = os.fspath(path_or_flavour)
        if os.path.isdir(path):
            for fname in ("tokenizer.json", "tokenizer.model"):
                if os.path.exists(os.path.join(path, fname)):
                    tok = _load_file(os.path.join(path, fname), config_dir=path)
                    break
            else:
                raise ValueError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        elif os.path.isfile(path):
            tok = _load_file(path, config_dir=os.path.dirname(path))
        else:
            raise ValueError(
                f"unknown tokenizer {path_or_flavour!r}: not a flavour ({', '.join(DEBUG_FLAVOURS)}) "
                "nor an existing path"
            )
    if template is not None or system is not None:
        tok.set_chat_template(template, system)
    return tok


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None


def read_chat_template(config_dir: str, config: dict) -> ChatTemplate | None:
    """The directory's own template, in transformers' order: chat_template.jinja, then tokenizer_config.json's
    chat_template (a string, or a list of {name, template}: "default"), then chat_template.json."""
    jinja = os.path.join(config_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return ChatTemplate(f.read(), jinja, jinja)
    for fname, cfg in (
        ("tokenizer_config.json", config),
        ("chat_template.json", _read_json(os.path.join(config_dir, "chat_template.json"))),
    ):
        where = os.path.join(config_dir, fname)
        value = cfg.get("chat_template")
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            if "default" not in named:
                raise ValueError(f"{where}: field 'chat_template' is a list without a 'default' template")
            value = named["default"]
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}: field 'chat_template' must be a string, got {type(value).__name__}")
        return ChatTemplate(value, where, where)
    return None


def _load_file(path: str, *, config_dir: str) -> Tokenizer:
    config = _read_json(os.path.join(config_dir, "tokenizer_config.json"))
    chat_template = read_chat_template(config_dir, config)
    if path.endswith(".json"):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        tok = RustTokenizer.from_file(path)
        # Tokens declared only in tokenizer_config.json are added on top as transformers adds them: in id
        # order, with their own "special" flag (a non-special one matches inside text), special anyway when
        # the config names it (eos_token, ...); add_tokens keeps the flag, add_special_tokens would not.
        named = {_token_text(config.get(key)) for key in NAMED_SPECIAL_TOKENS} - {None}
        missing = [
            AddedToken(
                spec["content"],
                special=spec.get("special", True) or spec["content"] in named,
                normalized=False,
            )
            for _, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
            if tok.token_to_id(spec["content"]) is None
        ]
        if missing:
            tok.add_tokens(missing)
        gen = _read_json(os.path.join(config_dir, "generation_config.json")).get("eos_token_id", [])
        extra = [gen] if isinstance(gen, int) else list(gen)
        return HFTokenizer(tok, name=path, config=config, extra_eos=extra, chat_template=chat_template)
    if _is_tiktoken_file(path):
        return TiktokenTokenizer(path, config=config, chat_template=chat_template)
    return SentencePieceTokenizer(path, config=config, chat_template=chat_template)
