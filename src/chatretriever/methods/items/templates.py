"""Query templates of the ten RecLM-emb tasks: the last template of each task is the test one.

The paper's queries were written by GPT-4; here templates fill the sampled attributes in (an
optional local chat LLM may paraphrase them: `paraphrase.py`). Test queries use a template that no
training query uses, so evaluation measures more than the memorised wording.

Fields: {history} (titles, newest first), {title}, {attributes} (rendered constraints),
{summary} (a user's tastes), {keywords}, {tag}, {misspelled}, {conditions}, {negated}.
"""

from __future__ import annotations

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


def templates_for(task: str, split: str) -> tuple[str, ...]:
    """The templates of a task for a split ("train": all but the last, "test": the last).

    Args:
        task: One of `TASKS`.
        split: "train" or "test".

    Returns:
        The templates (never shared between the two splits).
    """
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    all_ = TEMPLATES[task]
    if split == "train":
        return all_[:-N_TEST_TEMPLATES]
    if split == "test":
        return all_[-N_TEST_TEMPLATES:]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
