"""Built-in prompt-pair tasks: IOI, factual recall and random text.

Every generator is deterministic given ``seed`` and returns ``list[PromptPair]``. With a tokenizer,
the generators only emit pairs that pass :func:`atp_nnsight.data.tokenize_pairs` under it
(single-token targets, clean and noise of equal token length).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from .pairs import PromptPair

_MAX_TRIES = 200

# --------------------------------------------------------------------------------------------
# IOI
# --------------------------------------------------------------------------------------------

IOI_NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Tom", "Sarah", "Emma", "Michael", "David", "James",
    "Anna", "Paul", "Mark", "Lisa", "Kate", "Jack", "Sam", "Ben", "Max", "Dan",
    "Laura", "Rachel", "Daniel", "Andrew", "Peter", "George", "Henry", "Lucy", "Grace", "Rose",
    "Eric", "Kevin", "Steve", "Jane", "Amy", "Linda", "Susan", "Chris", "Tim", "Adam",
)  # fmt: skip
"""Common first names (all single tokens with a leading space under SmolLM2; with a tokenizer,
:func:`ioi_pairs` drops any that are not)."""

IOI_PLACES: tuple[str, ...] = (
    "store", "park", "school", "hospital", "restaurant", "station",
    "garden", "beach", "library", "house", "market", "cafe",
)  # fmt: skip

IOI_OBJECTS: tuple[str, ...] = (
    "drink", "ring", "book", "bone", "basketball", "computer",
    "necklace", "letter", "snack", "gift", "key", "flower",
)  # fmt: skip

IOI_TEMPLATES: tuple[str, ...] = (
    "When {0} and {1} went to the {place}, {2} gave a {object} to",
    "Then, {0} and {1} went to the {place}. {2} gave a {object} to",
    "After {0} and {1} went to the {place}, {2} gave a {object} to",
    "While {0} and {1} were working at the {place}, {2} gave a {object} to",
    "Then, {0} and {1} had a lot of fun at the {place}. {2} gave a {object} to",
    "Friends {0} and {1} found a {object} at the {place}. {2} gave it to",
    "When {0} and {1} got a {object} at the {place}, {2} decided to give it to",
    "Afterwards, {0} and {1} went to the {place}. {2} handed a {object} to",
)
"""IOI templates; name slots ``{0} {1} {2}``. ABBA fills them (IO, S, S), BABA (S, IO, S)."""

IOI_ORDERS: tuple[str, ...] = ("ABBA", "BABA")


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return n


def _prompt_len(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _single_token(tokenizer: Any, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def ioi_pairs(n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
    """Indirect Object Identification pairs (Wang et al. 2022, arXiv 2211.00593).

    Construction:

    * **Templates** (:data:`IOI_TEMPLATES`): eight sentence frames with three name slots, a place
      from :data:`IOI_PLACES` and an object from :data:`IOI_OBJECTS`, e.g.
      ``"When Mary and John went to the store, John gave a drink to"``. The first two slots
      introduce the indirect object (IO) and the subject (S); the third repeats S.
    * **Orders**: pairs alternate between ``ABBA`` (slots = IO, S, S; pairs 0, 2, 4, ...) and
      ``BABA`` (slots = S, IO, S; pairs 1, 3, 5, ...). Template, place, object and names are
      drawn at random (``random.Random(seed)``), IO != S, from :data:`IOI_NAMES`.
    * **Corruption ("ABC")**: the noise prompt is the same template, place and object with the
      three name slots filled by three other, distinct names (none equal to IO or S), so every
      token position lines up with the clean prompt and the noise prompt carries no information
      about which of IO / S is the answer.
    * **Targets**: ``clean_target = " " + IO``, ``noise_target = " " + S`` (the clean prompt's
      names). The default metric, ``logit[clean_target] - logit[noise_target]``, is therefore the
      IOI logit difference ``logit(IO) - logit(S)``: large and positive when the model completes
      the clean prompt with the indirect object.

    With a ``tokenizer``, only names that are a single token with a leading space are used, and
    draws are repeated until clean and noise have the same token length.
    """
    n = _check_n(n)
    rng = random.Random(seed)
    names = list(IOI_NAMES)
    if tokenizer is not None:
        names = [x for x in names if _single_token(tokenizer, " " + x)]
    if len(names) < 5:
        raise ValueError(
            f"IOI needs at least 5 single-token names; only {len(names)} of the pool qualify "
            f"under this tokenizer: {names}"
        )
    out = []
    for i in range(n):
        order = IOI_ORDERS[i % 2]
        for _ in range(_MAX_TRIES):
            template = rng.choice(IOI_TEMPLATES)
            place, obj = rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
            io, s, x, y, z = rng.sample(names, 5)
            slots = (io, s, s) if order == "ABBA" else (s, io, s)
            clean = template.format(*slots, place=place, object=obj)
            noise = template.format(x, y, z, place=place, object=obj)
            if tokenizer is None or _prompt_len(tokenizer, clean) == _prompt_len(tokenizer, noise):
                break
        else:
            raise ValueError(
                f"could not build IOI pair {i} with equal clean/noise token lengths "
                f"in {_MAX_TRIES} tries"
            )
        out.append(PromptPair(clean, noise, " " + io, " " + s))
    return out


# --------------------------------------------------------------------------------------------
# factual recall
# --------------------------------------------------------------------------------------------

CITY_COUNTRY: tuple[tuple[str, str], ...] = (
    ("Paris", "France"), ("Lyon", "France"), ("Marseille", "France"),
    ("Berlin", "Germany"), ("Munich", "Germany"), ("Hamburg", "Germany"),
    ("Frankfurt", "Germany"), ("Rome", "Italy"), ("Milan", "Italy"), ("Naples", "Italy"),
    ("Venice", "Italy"), ("Florence", "Italy"), ("Madrid", "Spain"), ("Barcelona", "Spain"),
    ("Seville", "Spain"), ("Tokyo", "Japan"), ("Osaka", "Japan"), ("Kyoto", "Japan"),
    ("Beijing", "China"), ("Shanghai", "China"), ("Moscow", "Russia"),
    ("Toronto", "Canada"), ("Vancouver", "Canada"), ("Montreal", "Canada"),
    ("Sydney", "Australia"), ("Melbourne", "Australia"), ("Cairo", "Egypt"),
    ("Mumbai", "India"), ("Delhi", "India"), ("Istanbul", "Turkey"), ("Athens", "Greece"),
    ("Lisbon", "Portugal"), ("Amsterdam", "Netherlands"), ("Vienna", "Austria"),
    ("Stockholm", "Sweden"), ("Oslo", "Norway"), ("Warsaw", "Poland"), ("Dublin", "Ireland"),
    ("Budapest", "Hungary"), ("Copenhagen", "Denmark"), ("Helsinki", "Finland"),
    ("Brussels", "Belgium"), ("Zurich", "Switzerland"), ("Geneva", "Switzerland"),
    ("Edinburgh", "Scotland"), ("Glasgow", "Scotland"), ("Havana", "Cuba"),
    ("Nairobi", "Kenya"), ("Seoul", "Korea"),
)  # fmt: skip
"""Well-known (city, country) pairs used by :func:`factual_pairs`."""

FACTUAL_TEMPLATES: tuple[str, ...] = (
    "The city of {city} is located in the country of",
    "{city} is a city in the country of",
    "Fact: the city of {city} is in the country of",
    "I just got back from {city}, which is a city in the country of",
)


def factual_pairs(n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
    """City -> country recall pairs.

    Clean: a template from :data:`FACTUAL_TEMPLATES` with a city from :data:`CITY_COUNTRY`, e.g.
    ``"The city of Paris is located in the country of"`` with target ``" France"``. Noise: the
    same template with another city of a *different* country; ``noise_target`` is that city's
    country. The metric ``logit[clean_target] - logit[noise_target]`` measures how much the model
    prefers the clean city's country over the noise city's.

    With a ``tokenizer``, only cities whose country is a single token (with a leading space) are
    used, and the noise city is drawn among those that give a noise prompt of the same token
    length as the clean prompt.
    """
    n = _check_n(n)
    rng = random.Random(seed)
    table = list(CITY_COUNTRY)
    if tokenizer is not None:
        table = [(c, k) for c, k in table if _single_token(tokenizer, " " + k)]
    if len({k for _, k in table}) < 2:
        raise ValueError("factual_pairs needs cities of at least two single-token countries")
    lengths: dict[tuple[str, str], int] = {}

    def length(template: str, city: str) -> int:
        key = (template, city)
        if key not in lengths:
            lengths[key] = _prompt_len(tokenizer, template.format(city=city))
        return lengths[key]

    out = []
    for i in range(n):
        for _ in range(_MAX_TRIES):
            template = rng.choice(FACTUAL_TEMPLATES)
            city, country = rng.choice(table)
            candidates = [(c, k) for c, k in table if k != country]
            if tokenizer is not None:
                target_len = length(template, city)
                candidates = [(c, k) for c, k in candidates if length(template, c) == target_len]
            if candidates:
                break
        else:
            raise ValueError(f"could not build factual pair {i} in {_MAX_TRIES} tries")
        other, other_country = rng.choice(candidates)
        out.append(
            PromptPair(
                template.format(city=city),
                template.format(city=other),
                " " + country,
                " " + other_country,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# random text
# --------------------------------------------------------------------------------------------

RANDOM_CORPUS: tuple[str, ...] = (
    "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp "
    "before the ships came in from the sea.",
    "After the long winter, the farmers were finally able to plant their crops in the warm "
    "and fertile soil of the valley.",
    "Scientists at the university discovered a new species of frog living high in the "
    "mountains of the remote northern province.",
    "She opened the letter slowly, unsure whether it contained good news or the bad news she "
    "had been dreading for weeks.",
    "The small bakery on the corner sells fresh bread every morning, and the line of customers "
    "often stretches down the street.",
    "During the storm, the power went out across the whole town, so families gathered around "
    "candles and told stories.",
    "The committee will meet again next Tuesday to discuss the budget and vote on the proposal "
    "for the new library.",
    "He practiced the piano for three hours a day because he wanted to win the regional "
    "competition in the spring.",
    "The river flows through the center of the city, and in summer people sit along its banks "
    "to eat lunch and watch the boats.",
    "Our teacher explained that the moon does not produce its own light but reflects the light "
    "of the sun.",
    "The museum recently opened an exhibition of ancient pottery found during the construction "
    "of the new subway line.",
    "When the train finally arrived, the passengers rushed onto the platform, carrying heavy "
    "bags and tired children.",
    "The recipe calls for two cups of flour, a pinch of salt, three eggs and a generous amount "
    "of butter.",
    "Many birds migrate south for the winter, flying thousands of miles to reach warmer "
    "climates and abundant food.",
    "The company announced that it would hire two hundred new employees to work at its factory "
    "near the harbor.",
    "In the quiet village, everyone knew each other, and news of the wedding spread within a "
    "single afternoon.",
    "The detective examined the muddy footprints near the window and concluded that the thief "
    "had escaped through the garden.",
    "Learning a new language takes patience, because progress often feels slow until one day "
    "everything suddenly makes sense.",
    "The children built a snowman in the front yard and gave it a carrot for a nose and two "
    "stones for eyes.",
    "Heavy rain caused the river to flood its banks, and several roads near the bridge were "
    "closed for the weekend.",
    "The new software update fixes several bugs and makes the application start much faster "
    "on older computers.",
    "At the end of the concert, the audience stood up and applauded for several minutes while "
    "the musicians bowed.",
    "My grandmother grows tomatoes, beans and peppers in her garden, and she gives most of them "
    "away to the neighbors.",
    "The hikers reached the summit just before sunrise and watched the sky turn orange above "
    "the distant hills.",
    "The city council approved a plan to build more bike lanes and plant thousands of trees "
    "along the main avenues.",
    "He forgot his umbrella at home, so by the time he reached the office his coat was "
    "completely soaked.",
    "The students spent the afternoon in the laboratory measuring the temperature of water as "
    "it slowly cooled.",
    "A strong wind blew across the desert, covering the road with sand and making it difficult "
    "for drivers to see.",
    "The restaurant is famous for its seafood, especially the grilled fish that is caught each "
    "morning by local fishermen.",
    "After reading the report, the manager decided to postpone the launch until the remaining "
    "problems were solved.",
)
"""Plain sentences from which :func:`random_pairs` cuts its prompts."""

_MIN_PREFIX = 4


def random_pairs(n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
    """Pairs of unrelated natural-text prompts of equal token length (a generic control task).

    Two different sentences of :data:`RANDOM_CORPUS` are cut after the same number of tokens
    (at least 4), where a new word starts; each target is the token that really follows its
    prompt in the sentence (``tokenizer.decode([id])``, with its leading space). Pairs whose
    prefixes do not re-tokenize to the same tokens, whose targets do not re-encode to one token
    or do not start a word, or whose two targets coincide are redrawn.
    The tokenizer is required.
    """
    n = _check_n(n)
    if tokenizer is None:
        raise ValueError("random_pairs needs a tokenizer (it cuts prompts at token boundaries)")
    rng = random.Random(seed)
    encoded = [list(tokenizer.encode(s, add_special_tokens=False)) for s in RANDOM_CORPUS]

    def cut(ids: list[int], length: int) -> tuple[str, str] | None:
        prompt = tokenizer.decode(ids[:length], clean_up_tokenization_spaces=False)
        target = tokenizer.decode([ids[length]])
        if not (target[:1].isspace() and target[1:2].isalnum()):  # a new word starts here
            return None
        if list(tokenizer.encode(prompt, add_special_tokens=False)) != ids[:length]:
            return None
        if list(tokenizer.encode(target, add_special_tokens=False)) != [ids[length]]:
            return None
        return prompt, target

    out = []
    for i in range(n):
        for _ in range(_MAX_TRIES):
            a, b = rng.sample(range(len(encoded)), 2)
            longest = min(len(encoded[a]), len(encoded[b])) - 1
            if longest < _MIN_PREFIX:
                continue
            length = rng.randint(_MIN_PREFIX, longest)
            clean, noise = cut(encoded[a], length), cut(encoded[b], length)
            if clean is None or noise is None or clean[1] == noise[1]:
                continue
            if _prompt_len(tokenizer, clean[0]) == _prompt_len(tokenizer, noise[0]):
                break
        else:
            raise ValueError(f"could not build random pair {i} in {_MAX_TRIES} tries")
        out.append(PromptPair(clean[0], noise[0], clean[1], noise[1]))
    return out


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[..., list[PromptPair]]] = {
    "ioi": ioi_pairs,
    "factual": factual_pairs,
    "random": random_pairs,
}


def make_task(name: str, n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
    """Generate ``n`` pairs of the built-in task ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](n, seed=seed, tokenizer=tokenizer)
