"""Datasets for tests, written as real files."""

from __future__ import annotations

import json
import random
from typing import Any

NAMES = [
    "Maria",
    "Kofi",
    "Ines",
    "Tomas",
    "Aiko",
    "Lena",
    "Omar",
    "Priya",
    "Jonas",
    "Zara",
    "Mateo",
    "Hana",
    "Ravi",
    "Elif",
    "Noah",
    "Sofia",
    "Yusuf",
    "Mila",
    "Arjun",
    "Clara",
]
CITIES = ["Lyon", "Accra", "Porto", "Brno", "Osaka", "Graz", "Cairo", "Pune", "Bergen", "Tunis"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} turned {age} last spring.",
    "At {age}, {name} moved to {city} for work.",
    "{name} ({age}) teaches music in {city}.",
]


def person_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """A narrow skill the base model lacks: answer a sentence with exactly one JSON object
    {"name": …, "age": …, "city": …} and nothing else."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        answer = json.dumps({"name": name, "age": age, "city": city})
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": sentence},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def arithmetic_rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"ANSWER: {2 * i}"},
            ]
        }
        for i in range(count)
    ]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()
