"""Query templates of the ten RecLM-emb tasks: the last template of each task is the test one.

The paper's queries were written by GPT-4; here templates fill the sampled attributes in (an
optional local chat LLM may paraphrase them: `paraphrase.py`). Test queries use a template that no
training query uses, so evaluation measures more than the memorised wording.

Fields: {history} (titles, newest first), {title}, {attributes} (rendered constraints),
{summary} (a user's tastes), {keywords}, {tag}, {misspelled}, {conditions}, {negated}.

`TEMPLATES` are the paper's Steam wording ("What should I play next?"), used for a catalog of
games (the schema's noun "game"); `NEUTRAL_TEMPLATES` say the same for any other catalog, with
{noun} / {nouns} filled in from the schema ("movie" / "movies").
"""

from __future__ import annotations

from chatretriever.methods.items.schema import GAME_NOUN

TASKS = ("UH2I", "I2I", "US2I", "FA2I", "SA2I", "AS2I", "NM2I", "VC2I", "NA2I", "UQ2I")
ID_TASKS = ("UH2I", "I2I", "US2I", "AS2I", "NM2I", "UQ2I")
"""Tasks whose targets are particular items: scored by precision@k (the fraction of targets)."""
ATTRIBUTE_TASKS = ("FA2I", "SA2I", "VC2I", "NA2I")
"""Tasks whose targets are every item meeting the query: scored by constraint_coverage@k."""
N_TEST_TEMPLATES = 1

TEMPLATES: dict[str, tuple[str, ...]] = {
    "UH2I": (
        "I have played {history}. What should I play next?",
        "Games I played recently: {history}",
        "{history}",
        "Based on my history ({history}), recommend a game.",
        "My recent games, newest first: {history}. Suggest the next one for me.",
    ),
    "I2I": (
        "Games similar to {title}",
        "{title}",
        "Players who liked {title} also liked",
        "Find games like {title}.",
        "Which games do fans of {title} usually play as well?",
    ),
    "US2I": (
        "{summary}",
        "Recommend a game for this player: {summary}",
        "User profile: {summary}",
        "Here is what I like: {summary} Any suggestions?",
    ),
    "FA2I": (
        "Find a game with {attributes}.",
        "{attributes}",
        "I want a game that has {attributes}.",
        "Looking for a title matching {attributes}.",
        "Show me something where {attributes}, please.",
    ),
    "SA2I": (
        "A game with {attributes}",
        "{attributes}",
        "Any game that has {attributes}?",
        "I'd like to play something with {attributes}.",
    ),
    "AS2I": (
        "{keywords} {tag} game",
        "{tag} {keywords}",
        "search {keywords} {tag}",
        "steam {keywords} ({tag})",
    ),
    "NM2I": (
        "{misspelled}",
        "find {misspelled}",
        "I'm looking for the game {misspelled}",
        "where can I get {misspelled}?",
    ),
    "VC2I": (
        "A game {conditions}.",
        "Find games {conditions}",
        "{conditions}",
        "Show me titles {conditions}, please.",
    ),
    "NA2I": (
        "A game with {attributes}, {negated}.",
        "{attributes}; {negated}",
        "Find something with {attributes} but {negated}.",
        "I want {attributes}, as long as it is {negated}.",
    ),
    "UQ2I": (
        "I have played {history}. Now I want a game with {attributes}.",
        "History: {history}. Query: {attributes}",
        "Given that I played {history}, find me {attributes}.",
        "After {history}, what should I play that has {attributes}?",
    ),
}


NEUTRAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "UH2I": (
        "I have liked {history}. What {noun} should I try next?",
        "My recent {nouns}: {history}",
        "{history}",
        "Based on my history ({history}), recommend a {noun}.",
        "My recent {nouns}, newest first: {history}. Suggest the next one for me.",
    ),
    "I2I": (
        "More {nouns} similar to {title}",
        "{title}",
        "People who liked {title} also liked",
        "Find {nouns} like {title}.",
        "Which {nouns} do fans of {title} usually like as well?",
    ),
    "US2I": (
        "{summary}",
        "Recommend a {noun} for this person: {summary}",
        "User profile: {summary}",
        "Here is what I like: {summary} Any suggestions?",
    ),
    "FA2I": (
        "Find a {noun} with {attributes}.",
        "{attributes}",
        "I want a {noun} that has {attributes}.",
        "Looking for one matching {attributes}.",
        "Show me something where {attributes}, please.",
    ),
    "SA2I": (
        "A {noun} with {attributes}",
        "{attributes}",
        "Any {noun} that has {attributes}?",
        "I'd like something with {attributes}.",
    ),
    "AS2I": (
        "{keywords} {tag} {noun}",
        "{tag} {keywords}",
        "search {keywords} {tag}",
        "{keywords} ({tag})",
    ),
    "NM2I": (
        "{misspelled}",
        "find {misspelled}",
        "I'm looking for the {noun} {misspelled}",
        "where can I get {misspelled}?",
    ),
    "VC2I": (
        "A {noun} {conditions}.",
        "Find {nouns} {conditions}",
        "{conditions}",
        "Show me {nouns} {conditions}, please.",
    ),
    "NA2I": (
        "A {noun} with {attributes}, {negated}.",
        "{attributes}; {negated}",
        "Find something with {attributes} but {negated}.",
        "I want {attributes}, as long as it is {negated}.",
    ),
    "UQ2I": (
        "I have liked {history}. Now I want a {noun} with {attributes}.",
        "History: {history}. Query: {attributes}",
        "Given that I liked {history}, find me {attributes}.",
        "After {history}, what should I try that has {attributes}?",
    ),
}
"""The templates of a catalog whose noun is not "game" ({noun}, {nouns}: the schema's)."""


def with_article(noun: str) -> str:
    """The noun with its indefinite article: "a movie", "an item" (a vowel letter first: the
    simple rule, which "an hour" or "a user" would get wrong)."""
    return f"{'an' if noun[:1].lower() in ('a', 'e', 'i', 'o', 'u') else 'a'} {noun}"


def templates_for(task: str, split: str, noun: str = GAME_NOUN, nouns: str = "") -> tuple[str, ...]:
    """The templates of a task for a split ("train": all but the last, "test": the last).

    Args:
        task: One of `TASKS`.
        split: "train" or "test".
        noun: What one item is: "game" gives the paper's Steam templates, any other noun the
            neutral ones naming it.
        nouns: Its plural (default: noun + "s").

    Returns:
        The templates (never shared between the two splits).
    """
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    all_ = TEMPLATES[task]
    if noun != GAME_NOUN:  # the schema checks a noun is words: no braces to break `format`
        plural = nouns or f"{noun}s"
        one = with_article(noun)  # "a item" would read wrong: "an item"
        all_ = tuple(
            t.replace("a {noun}", one)
            .replace("A {noun}", one[0].upper() + one[1:])
            .replace("{nouns}", plural)
            .replace("{noun}", noun)
            for t in NEUTRAL_TEMPLATES[task]
        )
    if split == "train":
        return all_[:-N_TEST_TEMPLATES]
    if split == "test":
        return all_[-N_TEST_TEMPLATES:]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
