"""The `builtin` corpus: English-like documents from a seeded probabilistic grammar.

Why: the demo and the tests need a corpus that is offline, byte-identical on every machine, long enough
to train a small model and SAEs on (≥ 8M byte tokens), and written by us. Every document is drawn from
its own `random.Random(index)` (Mersenne Twister seeded from an int: stable across Python versions and
platforms), so any document can be regenerated alone and the stream never depends on how it is read.

The grammar mixes genres with known structure — entity/attribute facts, stories with nested relative
clauses, dialogue, arithmetic, inventories with numbers and dates — and each document's genre is
returned as a label, ground truth an SAE's features can be compared against.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

N_DOCUMENTS = 36_000  # ≈ 9.8M bytes: above the 8M-token floor with a margin (a test checks it)

NAMES = (
    "Mara Tomas Ilse Joren Petra Anselm Wendy Osric Lina Bram Cora Dmitri Elena Fenna Gideon Hana "
    "Ivo Jasmin Kasper Lotte Milo Nadia Otto Priya Quentin Rosa Sven Talia Umar Vera Wim Xenia Yusuf Zora"
).split()
PLACES = (
    "Tarn Eskbridge Holloway Marrow Quillfield Redcastle Saltmere Thornbury Umberlee Valewick "
    "Westreach Yarrowdale Ashford Brindle Coldharbour Dunmore"
).split()
ANIMALS = "dog cat fox owl horse goat heron badger otter crow mouse lynx".split()
OBJECTS = ("lamp key box book coat cup kettle map rope lantern basket bell clock mirror sword violin").split()
COLORS = "red blue green yellow black white grey brown purple orange silver golden".split()
SIZES = "small large tiny huge narrow wide heavy light old new".split()
MATERIALS = "wood iron glass stone wool copper paper clay".split()
VERBS_PAST = "saw found carried painted lost mended sold hid opened followed".split()
MOTION = "walked ran drove sailed rode travelled hurried wandered".split()
FEELINGS = "happy tired curious angry calm worried proud hungry".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
GENRES = ("facts", "story", "dialogue", "arithmetic", "inventory", "letter")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Writer:
    """One document's worth of sentences, all drawn from one seeded generator."""

    def __init__(self, rng: random.Random):
        self.r = rng
        self.cast = rng.sample(NAMES, 4)
        self.town = rng.choice(PLACES)

    def person(self) -> str:
        return self.r.choice(self.cast)

    def thing(self) -> str:
        r = self.r
        adjs = []
        if r.random() < 0.6:
            adjs.append(r.choice(SIZES))
        if r.random() < 0.7:
            adjs.append(r.choice(COLORS))
        noun = r.choice(OBJECTS + ANIMALS)
        return " ".join(adjs + [noun])

    def noun_phrase(self, depth: int = 0) -> str:
        r = self.r
        core = f"the {self.thing()}"
        if depth < 2 and r.random() < 0.35:
            # Nested relative clause: "the fox that Mara saw in Tarn" / "… that the owl which … found"
            subject = self.person() if r.random() < 0.6 else self.noun_phrase(depth + 1)
            core += f" that {subject} {r.choice(VERBS_PAST)}"
            if r.random() < 0.3:
                core += f" in {r.choice(PLACES)}"
        return core

    def fact(self) -> str:
        r = self.r
        obj = r.choice(OBJECTS)
        kind = r.randrange(4)
        if kind == 0:
            return f"The {obj} is {r.choice(COLORS)}."
        if kind == 1:
            return f"The {obj} is made of {r.choice(MATERIALS)}."
        if kind == 2:
            return f"{self.person()} lives in {r.choice(PLACES)} and owns {_article(obj)} {obj}."
        return f"Every {r.choice(ANIMALS)} in {self.town} is {r.choice(SIZES)}."

    def story_sentence(self) -> str:
        r = self.r
        who = self.person()
        kind = r.randrange(5)
        if kind == 0:
            return f"{who} {r.choice(VERBS_PAST)} {self.noun_phrase()}."
        if kind == 1:
            return f"On {r.choice(WEEKDAYS)}, {who} {r.choice(MOTION)} to {r.choice(PLACES)}."
        if kind == 2:
            return f"{who} was {r.choice(FEELINGS)} because {self.noun_phrase()} was {r.choice(COLORS)}."
        if kind == 3:
            other = self.person()
            return f"When {who} met {other}, they talked about {self.noun_phrase()}."
        return f"{self.noun_phrase().capitalize()} was {r.choice(FEELINGS)}."

    def dialogue_turn(self) -> str:
        r = self.r
        who, other = self.person(), self.person()
        kind = r.randrange(4)
        if kind == 0:
            return f'"Where is the {r.choice(OBJECTS)}?" asked {who}.'
        if kind == 1:
            return f'"It is in {r.choice(PLACES)}," said {other}.'
        if kind == 2:
            n = r.randrange(2, 60)
            return f'"I counted {n} {r.choice(ANIMALS)}s," {who} said. "Are you sure?" asked {other}.'
        return f'"Do you like {self.noun_phrase()}?" {who} asked. "Yes," said {other}.'

    def arithmetic(self) -> str:
        r = self.r
        a, b = r.randrange(0, 11), r.randrange(0, 10)
        kind = r.randrange(4)
        if kind == 0:
            return f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
        if kind == 1:
            x, y = r.randrange(10, 500), r.randrange(10, 500)
            return f"{x} + {y} = {x + y}."
        if kind == 2:
            x, y = r.randrange(2, 13), r.randrange(2, 13)
            return f"{x} times {y} is {x * y}."
        big, small = max(a, b), min(a, b)
        return f"{NUMBER_WORDS[big].capitalize()} minus {NUMBER_WORDS[small]} is {NUMBER_WORDS[big - small]}."

    def inventory_line(self) -> str:
        r = self.r
        n = r.randrange(1, 100)
        price = r.randrange(1, 1000) / 10
        return f"- {n} x {r.choice(COLORS)} {r.choice(OBJECTS)} ({r.choice(MATERIALS)}) at {price:.2f} each"


def _paragraph(w: _Writer, make, n_min: int, n_max: int) -> str:
    return " ".join(make() for _ in range(w.r.randrange(n_min, n_max + 1)))


def builtin_document(index: int) -> tuple[str, str]:
    """Document `index` of the builtin corpus, and its genre label."""
    r = random.Random(index)
    w = _Writer(r)
    genre = GENRES[r.randrange(len(GENRES))]
    if genre == "facts":
        text = f"Facts about {w.town}.\n" + _paragraph(w, w.fact, 4, 12)
    elif genre == "story":
        paras = [_paragraph(w, w.story_sentence, 2, 6) for _ in range(r.randrange(1, 4))]
        text = f"A story from {w.town}.\n" + "\n\n".join(paras)
    elif genre == "dialogue":
        text = "\n".join(w.dialogue_turn() for _ in range(r.randrange(3, 10)))
    elif genre == "arithmetic":
        text = "Lesson: " + _paragraph(w, w.arithmetic, 4, 12)
    elif genre == "inventory":
        day = r.randrange(1, 29)
        head = f"Inventory of {w.person()}'s shop in {w.town}, {day} {r.choice(MONTHS)} {r.randrange(1800, 2030)}:"
        text = head + "\n" + "\n".join(w.inventory_line() for _ in range(r.randrange(3, 10)))
    else:
        who, to = w.person(), w.person()
        body = _paragraph(w, w.story_sentence, 2, 5)
        text = f"Dear {to},\n{body}\nYours, {who}"
    return text, genre


def builtin_documents(start: int = 0, stop: int = N_DOCUMENTS) -> Iterator[str]:
    """The builtin corpus's texts in order: documents `start` … `stop - 1`."""
    for i in range(start, stop):
        yield builtin_document(i)[0]
