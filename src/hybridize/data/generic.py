"""Non-reasoning chat prompts: writing, explaining and describing everyday topics.

They exist for one comparison: distilling on the teacher's reasoning traces against distilling
on its free-form text (the teacher's own completions of these prompts). Deterministic by seed; a
prompt is a topic in a template, and no two prompts of one set are the same.
"""

from __future__ import annotations

import hashlib
import random

TOPICS = (
    "the water cycle", "how bread rises", "city buses", "the history of the bicycle", "autumn leaves",
    "bees and pollination", "the moon's phases", "public libraries", "learning a new language", "tea",
    "the first day at a new job", "volcanoes", "how a refrigerator works", "chess", "the postal service",
    "rainforests", "a rainy afternoon", "recycling paper", "lighthouses", "the printing press",
    "coral reefs", "jazz music", "train stations", "how vaccines are tested", "desert plants",
    "the Olympic games", "street markets", "maps and map making", "owls", "solar panels",
    "a walk in the mountains", "museums", "the invention of the telephone", "snow", "gardening on a balcony",
    "the human heart", "old castles", "photography", "migratory birds", "the night sky in winter",
    "cooking rice", "bridges", "penguins", "the role of a referee", "wind turbines", "handwriting",
    "fire stations", "a village bakery", "the tides", "kites", "making friends as an adult",
    "the history of coffee", "river boats", "elephants", "board games", "wool and knitting", "clocks",
    "the first airplanes", "a summer festival", "how soap cleans",
)

TEMPLATES = (
    "Write a short paragraph about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Describe {topic} in a few sentences.",
    "Write a short story that involves {topic}.",
    "What are three interesting things about {topic}?",
    "Write a friendly letter to a friend that mentions {topic}.",
    "Give a short overview of {topic} for a school newsletter.",
    "Write a poem of four lines about {topic}.",
    "Why do people find {topic} interesting? Answer briefly.",
    "Write the opening of a magazine article about {topic}.",
    "Summarise what you know about {topic} in plain words.",
    "Write a dialogue between two people talking about {topic}.",
    "Describe a day in which {topic} plays a part.",
    "Write a short diary entry about {topic}.",
    "What would a visitor want to know about {topic}?",
    "Write a product-style description inspired by {topic}.",
    "Tell me something surprising about {topic}.",
    "Write a short speech introducing {topic} to an audience.",
    "Write a few tips for someone new to {topic}.",
    "Compare {topic} today with how it was a hundred years ago, briefly.",
    "Write a short encyclopedia-style entry on {topic}.",
    "Describe {topic} using all five senses.",
    "Write a short review of a book about {topic}.",
    "Explain why {topic} matters to a community.",
    "Write a short children's bedtime story about {topic}.",
)


def generic_prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct prompt rows ``{"messages": [user turn], "task": "generic", "id"}``, in a seeded order."""
    combos = [template.format(topic=topic) for topic in TOPICS for template in TEMPLATES]
    if not 1 <= n <= len(combos):
        raise ValueError(f"generic prompts: n must lie in 1..{len(combos)}, got {n}")
    random.Random(f"generic|{seed}").shuffle(combos)
    return [{"messages": [{"role": "user", "content": text}], "task": "generic",
             "id": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]} for text in combos[:n]]
