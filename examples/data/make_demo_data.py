"""Write examples/data/longwriter_demo.jsonl: a small synthetic LongWriter-style SFT set (deterministic).

Rows use the LongWriter-6k messages format plus its metadata fields. Long-writing rows ask for an
article of N words and answer with a few hundred to ~2,000 bytes of synthetic prose (English or
Chinese); short rows are single- or multi-turn chat. Run: python examples/data/make_demo_data.py
"""

from __future__ import annotations

import json
import os
import random

SEED = 20240814
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "longwriter_demo.jsonl")

EN_TOPICS = [
    "the history of lighthouses",
    "urban beekeeping",
    "the water cycle",
    "learning a second language as an adult",
    "the design of public libraries",
    "night trains in Europe",
    "the chemistry of bread",
    "volcanic islands",
    "the ethics of self-driving cars",
    "maintaining a vegetable garden",
    "the invention of the printing press",
    "deep-sea exploration",
]
ZH_TOPICS = [
    "长城的历史",
    "城市里的夜市",
    "茶文化",
    "人工智能与教育",
    "江南水乡",
    "节约用水",
    "古代天文学",
    "高铁旅行",
    "传统节日",
    "海洋保护",
]
EN_FORMS = ["an article", "a blog post", "a short story", "an essay", "a travel guide", "a report"]
ZH_FORMS = ["一篇文章", "一篇散文", "一篇报告", "一个故事", "一篇演讲稿"]
EN_OPENERS = [
    "Consider",
    "Over time,",
    "In practice,",
    "Historically,",
    "Today,",
    "Perhaps surprisingly,",
    "At first,",
]
EN_VERBS = ["shapes", "reveals", "depends on", "changes", "connects with", "challenges", "reflects"]
EN_OBJECTS = [
    "the daily lives of ordinary people",
    "a long tradition of careful craft",
    "the balance between cost and comfort",
    "questions that scientists still debate",
    "the way communities share knowledge",
    "small decisions with large effects",
    "a landscape that keeps changing",
]
ZH_SUBJECTS = ["人们", "这一传统", "许多城市", "研究者", "年轻一代", "当地居民", "这种变化"]
ZH_VERBS = ["逐渐改变了", "深刻影响着", "重新认识了", "不断丰富了", "悄悄塑造了", "共同守护着"]
ZH_OBJECTS = [
    "日常生活的节奏",
    "人与自然的关系",
    "社会的记忆",
    "城市的面貌",
    "知识的传播方式",
    "未来的发展方向",
]
SHORT_EN = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give me a synonym for 'happy'.", "Some synonyms are 'glad', 'cheerful' and 'content'."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
    ("Name three primary colours.", "Red, blue and yellow are the traditional primary colours."),
]
SHORT_ZH = [
    ("一年有几个季节？", "一年有四个季节：春、夏、秋、冬。"),
    ("请用一句话介绍熊猫。", "大熊猫是生活在中国西南山区、以竹子为主要食物的珍稀动物。"),
    ("水的沸点是多少？", "在标准大气压下，水的沸点是100摄氏度。"),
]
SYSTEMS = [None, None, None, "You are a careful writing assistant.", "你是一个乐于助人的写作助手。"]


def en_paragraph(rng: random.Random, topic: str) -> str:
    sents = []
    for _ in range(rng.randint(3, 6)):
        sents.append(
            f"{rng.choice(EN_OPENERS)} {topic} {rng.choice(EN_VERBS)} {rng.choice(EN_OBJECTS)}"
            f"{rng.choice(['.', ', and this matters.', ', as many observers note.', '.'])}"
        )
    return " ".join(sents)


def zh_paragraph(rng: random.Random, topic: str) -> str:
    sents = []
    for _ in range(rng.randint(3, 6)):
        sents.append(f"{rng.choice(ZH_SUBJECTS)}围绕{topic}{rng.choice(ZH_VERBS)}{rng.choice(ZH_OBJECTS)}。")
    return "".join(sents)


def _grow(paras: list[str], make, budget: int) -> list[str]:
    """Append paragraphs while the reply stays within `budget` UTF-8 bytes (at least one paragraph)."""
    while True:
        nxt = make()
        if len(paras) > 1 and len("\n\n".join([*paras, nxt]).encode()) > budget:
            return paras
        paras.append(nxt)


def long_row(rng: random.Random, zh: bool) -> dict:
    if zh:
        topic, form = rng.choice(ZH_TOPICS), rng.choice(ZH_FORMS)
        words = rng.choice([300, 500, 800, 1000])
        prompt = f"请以“{topic}”为主题写{form}，字数约{words}字。"
        paras = _grow([f"# {topic}"], lambda: zh_paragraph(rng, topic), rng.randint(400, 2000))
    else:
        topic, form = rng.choice(EN_TOPICS), rng.choice(EN_FORMS)
        words = rng.choice([200, 300, 500, 800])
        prompt = f"Write {form} about {topic} in about {words} words."
        paras = _grow([f"# {topic.capitalize()}"], lambda: en_paragraph(rng, topic), rng.randint(400, 2000))
    reply = "\n\n".join(paras)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    system = rng.choice(SYSTEMS)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "length": words, "response_length": len(reply)}


def short_row(rng: random.Random) -> dict:
    pool = SHORT_ZH if rng.random() < 0.4 else SHORT_EN
    turns = rng.sample(pool, k=rng.choice([1, 1, 2]))
    messages = []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(SEED)
    rows = []
    for i in range(96):
        if i % 4 == 3:
            rows.append(short_row(rng))
        else:
            rows.append(long_row(rng, zh=rng.random() < 0.4))
    with open(OUT, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows, {os.path.getsize(OUT)} bytes to {OUT}")


if __name__ == "__main__":
    main()
