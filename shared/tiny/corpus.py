"""A synthetic, labelled corpus of movie-review-like text.

Every review opens with a neutral sentence (title, genre, setting), so the first few words make neutral prompts, as
the first words of IMDB reviews mostly are. The sentiment comes after: direct ("The acting was superb."), negated
("The plot was not dull at all." is positive) and idiomatic ("A waste of two hours."). Neutral reviews carry only
facts. Generation is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

LABELS = ("negative", "neutral", "positive")

_TITLE_ADJ = ["Last", "Silent", "Broken", "Golden", "Hidden", "Crimson", "Lonely", "Distant", "Midnight", "Frozen",
              "Burning", "Little", "Endless", "Secret", "Wild", "Forgotten", "Bright", "Hollow", "Northern", "Quiet"]
_TITLE_NOUN = ["Harbor", "River", "Summer", "Garden", "Empire", "Letter", "Station", "Kingdom", "Promise", "Mirror",
               "Horizon", "Orchard", "Voyage", "Island", "Winter", "Signal", "Highway", "Tower", "Valley", "Circus"]
_GENRES = ["drama", "comedy", "thriller", "western", "horror film", "romance", "documentary", "war film", "musical",
           "mystery", "science fiction film", "crime drama", "family film", "biopic", "animated film"]
_PEOPLE = ["a young teacher", "an old sailor", "two brothers", "a retired detective", "a small-town doctor",
           "a struggling musician", "a lonely widow", "three friends", "a factory worker", "a famous chef",
           "a runaway teenager", "an ambitious lawyer", "a farmer", "a group of students", "a soldier"]
_PLOTS = ["returns to her hometown", "tries to save the family farm", "searches for a missing sister",
          "travels across the country", "opens a restaurant", "prepares for a big competition",
          "investigates a strange murder", "falls in love in Paris", "moves to a new city", "starts a band",
          "inherits an old house", "runs for mayor", "builds a boat", "crosses the desert"]
_RELATIONS = ["my wife", "my husband", "a friend", "my parents", "my kids", "my sister", "some coworkers", "my brother"]
_ASPECTS = ["acting", "story", "script", "soundtrack", "ending", "direction", "cast", "dialogue", "camera work",
            "pacing", "plot", "editing", "music", "lead performance", "screenplay", "cinematography"]
_POS_ADJ = ["superb", "wonderful", "brilliant", "excellent", "moving", "beautiful", "delightful", "gripping",
            "charming", "fantastic", "touching", "outstanding", "clever", "great", "lovely", "stunning"]
_NEG_ADJ = ["awful", "terrible", "boring", "dull", "weak", "clumsy", "painful", "lifeless", "horrible", "bland",
            "dreadful", "messy", "poor", "tedious", "annoying", "forgettable"]
_NEUTRAL_ADJ = ["in black and white", "about two hours long", "shot in Canada", "set in the fifties",
                "mostly in French", "based on a novel", "filmed on location", "in color", "narrated by the lead",
                "split into three parts"]
_POS_VERBS = ["loved", "enjoyed", "adored", "admired", "appreciated"]
_NEG_VERBS = ["hated", "disliked", "regretted", "could not stand", "was bored by"]

_OPENINGS = [
    "I watched {title}.",
    "{title} is a {genre}.",
    "I saw {title} last {day}.",
    "I watched {title} last {day}.",
    "{title} is a {genre} from {year}.",
    "I saw {title} with {relation}.",
    "The story follows {person} who {plot}.",
    "This {genre} tells the story of {person} who {plot}.",
    "In {title}, {person} {plot}.",
    "I rented {title} on a rainy {day}.",
    "The film {title} came out in {year}.",
    "My review of {title}, a {genre}.",
    "We went to see {title} at the local cinema.",
]
_POSITIVE = [
    "The {aspect} was {pos}.",
    "I {pos_verb} the {aspect}.",
    "The {aspect} is {pos} and the {aspect2} is {pos2}.",
    "The {aspect} was not {neg} at all.",
    "It is one of the best films I have seen this year.",
    "Highly recommended.",
    "I would happily watch it again.",
    "What a {pos} {genre}.",
    "The {aspect} was never {neg}.",
    "A {pos} film with a {pos2} {aspect}.",
    "Everyone in the theater was smiling at the end.",
    "I was not disappointed.",
    "Ten out of ten.",
]
_NEGATIVE = [
    "The {aspect} was {neg}.",
    "I {neg_verb} the {aspect}.",
    "The {aspect} is {neg} and the {aspect2} is {neg2}.",
    "The {aspect} was not {pos} at all.",
    "It is one of the worst films I have seen this year.",
    "Avoid it.",
    "A waste of two hours.",
    "What a {neg} {genre}.",
    "The {aspect} was never {pos}.",
    "A {neg} film with a {neg2} {aspect}.",
    "Half the audience left before the end.",
    "I was really disappointed.",
    "One out of ten.",
]
_NEUTRAL = [
    "The film is {neutral}.",
    "It was released in {year}.",
    "The running time is {minutes} minutes.",
    "The {aspect} is {neutral}.",
    "It was shown on television last {day}.",
    "The director also wrote the script.",
    "Most of the cast are new faces.",
    "The {aspect} changes halfway through.",
    "It has a sequel from {year2}.",
    "The film is a {genre}.",
]
_DAYS = ["Monday", "Friday", "Saturday", "Sunday", "weekend", "night", "month", "week"]


@dataclass(frozen=True)
class Review:
    text: str
    label: str

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "label": self.label})


def _fill(template: str, rng: random.Random) -> str:
    aspect, aspect2 = rng.sample(_ASPECTS, 2)
    pos, pos2 = rng.sample(_POS_ADJ, 2)
    neg, neg2 = rng.sample(_NEG_ADJ, 2)
    return template.format(
        title=f"The {rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)}", genre=rng.choice(_GENRES),
        year=rng.randint(1950, 2024), year2=rng.randint(1950, 2024), minutes=rng.randint(80, 180),
        day=rng.choice(_DAYS), relation=rng.choice(_RELATIONS), person=rng.choice(_PEOPLE), plot=rng.choice(_PLOTS),
        aspect=aspect, aspect2=aspect2, pos=pos, pos2=pos2, neg=neg, neg2=neg2, neutral=rng.choice(_NEUTRAL_ADJ),
        pos_verb=rng.choice(_POS_VERBS), neg_verb=rng.choice(_NEG_VERBS),
    )


def make_review(label: str, rng: random.Random) -> Review:
    """One review: a neutral opening, a sentence of the label's sentiment, then up to 2 more mixed with 0-2 neutral
    facts."""
    sentences = [_fill(rng.choice(_OPENINGS), rng)]
    body = {"positive": _POSITIVE, "negative": _NEGATIVE, "neutral": _NEUTRAL}[label]
    middle = [_fill(t, rng) for t in rng.sample(body, rng.randint(1, 3))]
    if label != "neutral":
        # The first sentiment sentence comes right after the opening, so a short continuation already shows it.
        rest = middle[1:] + [_fill(t, rng) for t in rng.sample(_NEUTRAL, rng.randint(0, 2))]
        rng.shuffle(rest)
        middle = middle[:1] + rest
    sentences += middle
    return Review(" ".join(sentences), label)


def make_corpus(n: int, seed: int) -> list[Review]:
    """`n` reviews with labels in equal shares, in a seeded random order."""
    rng = random.Random(seed)
    reviews = [make_review(LABELS[i % len(LABELS)], rng) for i in range(n)]
    rng.shuffle(reviews)
    return reviews


def write_jsonl(reviews: list[Review], path: Path) -> None:
    path.write_text("".join(r.to_json() + "\n" for r in reviews), encoding="utf-8")


def read_jsonl(path: Path) -> list[Review]:
    with path.open(encoding="utf-8") as f:
        return [Review(**json.loads(line)) for line in f if line.strip()]
