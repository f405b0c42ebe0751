"""Quality side of LongBench-Write: the LLM judge, a tolerant parser of its reply, and the SQ aggregate.

Used by evaluation/ (LongBench-Write's S_q) and by data_gen.preference (S_q of each sampled response).

Faithful to THUDM/LongWriter evaluation/eval_quality.py where it matters for the number:
  - six dimensions scored 1..5, SQ = mean over dimensions of (mean score - 1) * 25;
  - the judge is asked up to 5 times for one item until its reply parses;
  - items that never parse are left out of the means (official). evalscope instead counts every dimension
    of such an item as 3 (``missing="as_3"``).
Deliberate differences: the parser accepts more than ``json.loads`` on a ```json fence (prose around the
object, other fences, trailing commas, single quotes, full-width punctuation, Chinese keys, scores as
strings or as {"score": n}), and rejects scores that are not integers in [1, 5] (4.5, 7, 0), which the
official code would average; such a reply counts as unparsed and the judge is asked again.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_JUDGE_MODEL",
    "DIMENSIONS",
    "JudgeResult",
    "aggregate_quality",
    "judge_response",
    "load_judge_template",
    "parse_judge_output",
    "render_judge_prompt",
]

DEFAULT_JUDGE_MODEL = "gpt-4o-2024-05-13"
DIMENSIONS: tuple[str, ...] = (
    "Relevance",
    "Accuracy",
    "Coherence",
    "Clarity",
    "Breadth and Depth",
    "Reading Experience",
)
MISSING_POLICIES = ("exclude", "as_3")

# Spellings a judge uses for each dimension, compared after _norm_key (lower case, "&" -> "and",
# everything but ASCII letters and CJK ideographs removed, so "breadth_and_depth" == "Breadth & Depth").
_ALIASES: dict[str, tuple[str, ...]] = {
    "Relevance": ("relevance", "relevancy", "相关性", "相关度", "切题性"),
    "Accuracy": ("accuracy", "准确性", "准确度", "正确性"),
    "Coherence": ("coherence", "连贯性", "连贯度", "逻辑性"),
    "Clarity": ("clarity", "清晰度", "清晰性", "清晰"),
    "Breadth and Depth": (
        "breadthanddepth",
        "breadthdepth",
        "depthandbreadth",
        "广度和深度",
        "广度与深度",
        "深度和广度",
        "深度与广度",
        "广度深度",
    ),
    "Reading Experience": ("readingexperience", "readability", "阅读体验", "可读性"),
}
_KEY_TO_DIM = {alias: dim for dim, aliases in _ALIASES.items() for alias in aliases}
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\n?(.*?)```", re.DOTALL)
_PLACEHOLDER_RE = re.compile(r"\$INST\$|\$RESPONSE\$")


def load_judge_template(path: str | None = None) -> str:
    """The judge prompt: ``path`` if given (e.g. the official judge.txt), else data_gen/prompts/judge.txt."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    # Next to this file (setup.py ships data_gen/prompts/*.txt), not importlib.resources: under pytest a
    # tests/ folder of the same name can shadow the package.
    with open(os.path.join(os.path.dirname(__file__), "prompts", "judge.txt"), encoding="utf-8") as f:
        return f.read()


def render_judge_prompt(template: str, instruction: str, response: str) -> str:
    # One pass over both placeholders, so a "$RESPONSE$" inside the user's prompt is not substituted again.
    return _PLACEHOLDER_RE.sub(lambda m: instruction if m.group(0) == "$INST$" else response, template)


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z\u4e00-\u9fff]", "", key.lower().replace("&", "and"))


def _score_value(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        v = float(value)
    elif isinstance(value, str):
        m = _NUMBER_RE.search(value)
        if m is None:
            return None
        v = float(m.group(0))
    elif isinstance(value, Mapping):  # {"score": 4, "reason": "..."}
        for k in ("score", "rating", "value", "评分", "分数", "得分"):
            if k in value:
                return _score_value(value[k])
        return None
    else:
        return None
    # The judge is asked for integers 1..5; a 4.5 or a 7 means it did not follow the format: ask again.
    if not (1.0 <= v <= 5.0 and v.is_integer()):
        return None
    return int(v)


def _scores_from_mapping(obj: object) -> dict[str, float] | None:
    """All six dimensions from a decoded JSON value, looking one level into nested objects."""
    if not isinstance(obj, Mapping):
        return None
    found: dict[str, float] = {}
    for k, v in obj.items():
        dim = _KEY_TO_DIM.get(_norm_key(str(k)))
        if dim is not None and dim not in found:
            s = _score_value(v)
            if s is not None:
                found[dim] = s
    if len(found) == len(DIMENSIONS):
        return {d: found[d] for d in DIMENSIONS}
    for v in obj.values():  # {"scores": {...}}
        nested = _scores_from_mapping(v) if isinstance(v, Mapping) else None
        if nested is not None:
            return nested
    return None


def _balanced_objects(text: str) -> Iterable[str]:
    """Top-level {...} spans, skipping braces inside JSON strings."""
    depth, start, in_str, escape = 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                yield text[start : i + 1]


def _decode(candidate: str) -> object | None:
    attempts = [candidate]
    repaired = re.sub(r",\s*([}\]])", r"\1", candidate)  # trailing commas
    repaired = repaired.translate(str.maketrans({"“": '"', "”": '"', "：": ":", "，": ","}))
    attempts.append(repaired)
    for text in attempts:
        try:
            return json.loads(text, strict=False)  # strict=False: raw newlines inside strings
        except ValueError:
            pass
    try:  # single-quoted, Python-style dicts
        return ast.literal_eval(repaired)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _regex_scores(text: str) -> dict[str, float] | None:
    """Last resort: `Key: n` / `"Key": "n"` / `**Key**: n/5` lines anywhere in the text."""
    found: dict[str, float] = {}
    for dim, aliases in _ALIASES.items():
        names = {dim, dim.replace(" ", "_"), dim.replace(" and ", " & ")} | {
            a for a in aliases if not a.isascii()
        }
        alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        pat = rf"(?:{alt})[\"'*\s]*[:：=]\s*[\"'*]*\s*(-?\d+(?:\.\d+)?)"
        matches = re.findall(pat, text, flags=re.IGNORECASE)
        if matches:
            s = _score_value(matches[-1])  # the final verdict comes last
            if s is not None:
                found[dim] = s
    return {d: found[d] for d in DIMENSIONS} if len(found) == len(DIMENSIONS) else None


def parse_judge_output(text: str | None) -> dict[str, float] | None:
    """Scores of all six dimensions (each an integer in [1, 5]) from a judge reply, or None if they cannot be read."""
    if not text:
        return None
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)]
    candidates += list(_balanced_objects(text))
    first, last = text.find("{"), text.rfind("}")
    if 0 <= first < last:
        candidates.append(text[first : last + 1])
    for cand in candidates:
        scores = _scores_from_mapping(_decode(cand.strip()))
        if scores is not None:
            return scores
    return _regex_scores(text)


@dataclass
class JudgeResult:
    scores: dict[str, float] | None  # None: no reply parsed within max_attempts
    attempts: int
    outputs: list[str] = field(default_factory=list)  # raw replies, for the judge.jsonl audit trail


async def judge_response(
    client,
    template: str,
    instruction: str,
    response: str,
    *,
    temperature: float = 0.5,
    max_tokens: int = 1024,
    max_attempts: int = 5,
    **extra_body,
) -> JudgeResult:
    """Ask ``client`` (data_gen.llm.LLMClient) to judge one response, re-asking while the reply does not parse.

    Transport failures are the client's business (it retries); an LLMError that survives them propagates, so
    the runner can leave the item unjudged and retry it on the next run instead of counting it as unparsed.
    """
    messages = [{"role": "user", "content": render_judge_prompt(template, instruction, response)}]
    outputs: list[str] = []
    for attempt in range(1, max_attempts + 1):
        completion = await client.chat(messages, temperature=temperature, max_tokens=max_tokens, **extra_body)
        outputs.append(completion.text)
        scores = parse_judge_output(completion.text)
        if scores is not None:
            return JudgeResult(scores, attempt, outputs)
    return JudgeResult(None, max_attempts, outputs)


def aggregate_quality(items: Sequence[Mapping[str, float] | None], missing: str = "exclude") -> dict:
    """SQ and its per-dimension parts over judged items (None = never parsed).

    missing="exclude" (official LongWriter): unparsed items are left out; "as_3" (evalscope): each of their
    dimensions counts as 3. Returns {"score_q", "dimensions", "n_scored", "n_missing"}; score_q is None when
    nothing is left to average.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    n_missing = sum(1 for s in items if s is None)
    rows = [s for s in items if s is not None]
    if missing == "as_3":
        rows += [dict.fromkeys(DIMENSIONS, 3)] * n_missing
    if not rows:
        return {"score_q": None, "dimensions": {}, "n_scored": 0, "n_missing": n_missing}
    dims = {d: (sum(float(r[d]) for r in rows) / len(rows) - 1.0) * 25.0 for d in DIMENSIONS}
    return {
        "score_q": sum(dims.values()) / len(dims),
        "dimensions": dims,
        "n_scored": len(items) - n_missing,
        "n_missing": n_missing,
    }
