"""The demo's instruction dataset: written for this project (Apache-2.0), generated deterministically.

Short tasks with one correct, terse answer — capitals, unit conversions, word opposites, sentiment labels and
JSON extraction — so that a small model's improvement from fine-tuning is measurable with exact match and ROUGE-L
on the held-out split (base models answer correctly but verbosely, or not at all).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ukraine": "Kyiv", "Ireland": "Dublin",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Hungary": "Budapest",
    "Czechia": "Prague", "Australia": "Canberra", "New Zealand": "Wellington", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Cuba": "Havana", "Colombia": "Bogota", "Venezuela": "Caracas", "Iceland": "Reykjavik",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "open": "closed",
    "early": "late", "rich": "poor", "strong": "weak", "young": "old", "full": "empty", "high": "low",
    "hard": "soft", "wet": "dry", "loud": "quiet", "clean": "dirty", "easy": "difficult", "long": "short",
    "thick": "thin", "true": "false", "near": "far", "first": "last", "win": "lose", "buy": "sell",
    "up": "down", "inside": "outside", "push": "pull", "begin": "end", "cheap": "expensive", "heavy": "light",
}
GOOD = ["great", "wonderful", "excellent", "delightful", "fantastic", "superb", "lovely", "brilliant"]
BAD = ["terrible", "awful", "disappointing", "horrible", "dreadful", "poor", "boring", "broken"]
THINGS = ["movie", "phone", "restaurant", "book", "hotel", "laptop", "concert", "coffee", "game", "service"]
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Quito", "Krakow", "Austin", "Leeds", "Pune", "Perth", "Lyon"]


def generate(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    makers = [_capital, _convert, _opposite, _sentiment, _extract]
    rows, seen = [], set()
    while len(rows) < n:
        row = rng.choice(makers)(rng)
        if row["instruction"] not in seen:
            seen.add(row["instruction"])
            rows.append(row)
    return rows


def _capital(rng):
    country = rng.choice(list(CAPITALS))
    q = rng.choice(["What is the capital of {}?", "Name the capital city of {}.", "{}: which city is the capital?"])
    return {"instruction": q.format(country) + " Answer with the city name only.", "response": CAPITALS[country]}


def _convert(rng):
    unit, factor, target = rng.choice([("km", 1000, "m"), ("m", 100, "cm"), ("kg", 1000, "g"), ("h", 60, "min"),
                                       ("min", 60, "s")])
    n = rng.randint(2, 40)
    return {"instruction": f"Convert {n} {unit} to {target}. Answer with the number and unit only.",
            "response": f"{n * factor} {target}"}


def _opposite(rng):
    word = rng.choice(list(OPPOSITES))
    return {"instruction": f"Give the opposite of the word '{word}'. Answer with one word.",
            "response": OPPOSITES[word]}


def _sentiment(rng):
    positive = rng.random() < 0.5
    adj = rng.choice(GOOD if positive else BAD)
    thing = rng.choice(THINGS)
    review = rng.choice(["The {t} was {a}.", "What a {a} {t}!", "Honestly, a {a} {t} overall.",
                         "I found the {t} {a} from start to finish."]).format(t=thing, a=adj)
    return {"instruction": f"Classify the sentiment of this review as positive or negative: \"{review}\"",
            "response": "positive" if positive else "negative"}


def _extract(rng):
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    text = rng.choice(["My name is {n} and I live in {c}.", "{n} here, writing from {c}.",
                       "Greetings from {c}! I am {n}."]).format(n=name, c=city)
    return {"instruction": f"Extract the name and city as JSON from: \"{text}\"",
            "response": json.dumps({"name": name, "city": city})}


def write(path: str | Path, n: int = 400, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in generate(n, seed)) + "\n")
    return path


def shipped_path() -> Path:
    """The copy shipped inside the package (regenerate with ``python -m llmops_jupyter.demo_data``)."""
    return Path(__file__).parent / "data" / "demo_instructions.jsonl"


if __name__ == "__main__":
    print(write(shipped_path()))
