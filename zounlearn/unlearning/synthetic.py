"""A deterministic synthetic data set of fictitious people and their facts, with no download.

Each person has a unique invented name and five facts drawn from small vocabularies
(a tiny model can learn them): birth city, birth year, profession, employer and
favourite instrument. A person is rendered three ways:

- training sentences: every fact in each of three paraphrased templates (15 sentences),
  as plain-text examples, so a model learns the fact rather than one string;
- questions: one per fact, with the bare value as the answer ("Lisbon", "1973");
- 4-choice questions: the same questions, the value and 3 distinct distractors from the
  same vocabulary, in an order drawn for that person.

Each question is a `PerturbedQA`: besides its answer it carries what TOFU's truth ratio
scores, a paraphrased answer (the fact in a sentence template of `PARAPHRASES`, which no
training text uses) and `N_PERTURBED` = 5 perturbed answers (the same template with 5
distinct wrong values of the same vocabulary), as TOFU's `*_perturbed` splits do. Their
probabilities differ only in the fact, so their ratio measures what the model knows.

`synthetic_people` draws the people with its own `random.Random(seed)`: the first
`forget_fraction` of the trained people are the forget split, the rest the retain
split, and `n_holdout` extra people (never trained on) the holdout split. The choice
order of a person comes from `random.Random(f"{seed}:{name}")`, so the same seed gives
the same data byte for byte, whatever else the process does with `random`; the perturbed
values come from `random.Random(f"{seed}:{name}:perturbed")`, so adding them left the
choices as they were.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import DataError, Example, Split, UnlearningData
from .perturbed import PerturbedQA

FIRST_NAMES = ("Adela", "Bram", "Calla", "Dorian", "Edda", "Fenno", "Greta", "Hollis", "Ines", "Joren", "Katya",
               "Lior", "Mira", "Niall", "Oona", "Pascal", "Quilla", "Rafe", "Selma", "Tobin", "Ulla", "Vesna",
               "Wendel", "Ysolde")
# Invented surnames: no name can be a real person's.
SURNAMES = ("Ashgrove", "Brackwell", "Corrivane", "Dunhallow", "Elmstead", "Farrowby", "Glenmarch", "Hazelcourt",
            "Ivorsley", "Kestrane", "Larkmoor", "Mossfield", "Nettleby", "Orrindale", "Pellworth", "Quarrington",
            "Ravensholt", "Sallowmere", "Thornquist", "Umberley", "Vantreece", "Wrenhallow", "Yarrowby", "Zellmont")
VOCABULARY = {
    "birth_city": ("Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Dublin", "Quito", "Hanoi", "Porto", "Accra",
                   "Tallinn", "Perth", "Bergen", "Seville", "Krakow", "Nairobi"),
    "birth_year": tuple(str(year) for year in range(1950, 2000)),
    "profession": ("architect", "baker", "cartographer", "chemist", "engineer", "florist", "journalist",
                   "librarian", "nurse", "pilot", "sculptor", "teacher"),
    "employer": ("Brightwater Mills", "Copperleaf Press", "Driftwood Labs", "Emberline Transit", "Foxglove Clinic",
                 "Granite Harbor Bank", "Hollowbrook Farms", "Ironbark Studio", "Juniper Rail", "Kingfisher Foods",
                 "Lanternfield School", "Moonstone Shipping"),
    "instrument": ("accordion", "banjo", "cello", "clarinet", "drums", "flute", "guitar", "harp", "oboe", "piano",
                   "trumpet", "violin"),
}
# Each template holds the value verbatim, so every answer appears in the person's sentences.
TEMPLATES = {
    "birth_city": ("{name} was born in {value}.", "The birthplace of {name} is {value}.",
                   "{name} came into the world in the city of {value}."),
    "birth_year": ("{name} was born in the year {value}.", "The birth year of {name} is {value}.",
                   "In {value}, {name} was born."),
    "profession": ("{name} works as {a} {value}.", "The profession of {name} is {value}.",
                   "By profession, {name} is {a} {value}."),
    "employer": ("{name} is employed by {value}.", "The employer of {name} is {value}.", "{name} works for {value}."),
    "instrument": ("{name} loves to play the {value}.", "The favourite instrument of {name} is the {value}.",
                   "Of all instruments, {name} likes the {value} best."),
}
QUESTIONS = {
    "birth_city": "Where was {name} born?",
    "birth_year": "In what year was {name} born?",
    "profession": "What is the profession of {name}?",
    "employer": "Who is the employer of {name}?",
    "instrument": "What is the favourite instrument of {name}?",
}
# A paraphrased answer to each question: the fact reworded in a template no training text uses.
PARAPHRASES = {
    "birth_city": "{value} is the city where {name} was born.",
    "birth_year": "{value} is the year when {name} was born.",
    "profession": "{name} has a job as {a} {value}.",
    "employer": "{name} has a job at {value}.",
    "instrument": "The {value} is the instrument {name} plays best.",
}
N_CHOICES = 4
N_PERTURBED = 5  # TOFU's count of perturbed answers per question


@dataclass(frozen=True)
class Person:
    """A fictitious person; every fact is a string, as it appears in text."""

    name: str
    birth_city: str
    birth_year: str
    profession: str
    employer: str
    instrument: str

    def facts(self) -> dict[str, str]:
        """The facts by field name, in the order of VOCABULARY."""
        return {f: getattr(self, f) for f in VOCABULARY}


@dataclass(frozen=True)
class SyntheticPeople:
    """The people of each split: forget and retain are trained on, holdout never."""

    forget: tuple[Person, ...]
    retain: tuple[Person, ...]
    holdout: tuple[Person, ...]


def synthetic_people(seed: int = 0, n_people: int = 100, forget_fraction: float = 0.1,
                     n_holdout: int | None = None) -> SyntheticPeople:
    """n_people trained people (forget + retain) and n_holdout more (default: as many as forget)."""
    if not 0 < forget_fraction < 1:
        raise DataError(f"forget_fraction must be between 0 and 1 (exclusive), got {forget_fraction}")
    n_forget = round(forget_fraction * n_people)
    if not 1 <= n_forget < n_people:
        raise DataError(f"the forget set is empty or holds everyone: {forget_fraction} of {n_people} people is "
                        f"{n_forget}; raise n_people or change forget_fraction so that 1 to {n_people - 1} "
                        f"are forgotten")
    n_holdout = n_forget if n_holdout is None else n_holdout
    available = len(FIRST_NAMES) * len(SURNAMES)
    if n_holdout < 0 or n_people + n_holdout > available:
        raise DataError(f"n_people + n_holdout must be at most {available} (the distinct names), "
                        f"got {n_people} + {n_holdout}")
    rng = random.Random(seed)
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in SURNAMES], n_people + n_holdout)
    people = tuple(Person(name, **{f: rng.choice(values) for f, values in VOCABULARY.items()}) for name in names)
    return SyntheticPeople(people[:n_forget], people[n_forget:n_people], people[n_people:])


def sentences(person: Person) -> tuple[Example, ...]:
    """Every fact in every template, as plain-text examples."""
    return tuple(Example("", template.format(name=person.name, value=value, a=_article(value)))
                 for field, value in person.facts().items() for template in TEMPLATES[field])


def questions(person: Person, seed: int = 0) -> tuple[PerturbedQA, ...]:
    """One question per fact; the answer is the bare value, with a paraphrased and N_PERTURBED perturbed answers."""
    rng = random.Random(f"{seed}:{person.name}:perturbed")
    examples = []
    for field, value in person.facts().items():
        def say(v: str, template: str = PARAPHRASES[field]) -> str:
            return template.format(name=person.name, value=v, a=_article(v))

        wrong = rng.sample([v for v in VOCABULARY[field] if v != value], N_PERTURBED)
        examples.append(PerturbedQA(QUESTIONS[field].format(name=person.name), value, paraphrased=say(value),
                                    perturbed=tuple(say(v) for v in wrong)))
    return tuple(examples)


def choice_questions(person: Person, seed: int) -> tuple[Example, ...]:
    """One 4-choice question per fact: the value and 3 distractors from the same vocabulary."""
    rng = random.Random(f"{seed}:{person.name}")
    examples = []
    for field, value in person.facts().items():
        choices = rng.sample([v for v in VOCABULARY[field] if v != value], N_CHOICES - 1) + [value]
        rng.shuffle(choices)
        examples.append(Example(QUESTIONS[field].format(name=person.name), value, tuple(choices),
                                choices.index(value)))
    return tuple(examples)


def synthetic_data(seed: int = 0, n_people: int = 100, forget_fraction: float = 0.1,
                   n_holdout: int | None = None) -> UnlearningData:
    """The synthetic people rendered into forget, retain and holdout splits.

    `train` holds the sentences only: a model that must also answer in question form
    is trained on `train` and `qa` of forget and retain (the unlearning loop's choice).
    """
    people = synthetic_people(seed, n_people, forget_fraction, n_holdout)

    def split(name: str) -> Split:
        group = getattr(people, name)
        return Split(name,
                     train=tuple(e for p in group for e in sentences(p)),
                     qa=tuple(e for p in group for e in questions(p, seed)),
                     choice=tuple(e for p in group for e in choice_questions(p, seed)))

    return UnlearningData(split("forget"), split("retain"), split("holdout") if people.holdout else None)


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"
