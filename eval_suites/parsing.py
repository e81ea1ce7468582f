"""Robust answer parsers shared by the suites' ``strict`` mode.

``official`` mode never uses these: each suite module reproduces its official script's own
parse, quirks included.
"""

from __future__ import annotations

import re

YES_WORDS = {"yes", "yeah", "yep", "true", "correct"}
NO_WORDS = {"no", "nope", "false", "incorrect"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    return " ".join(words(text))


def strict_yes_no(text: str) -> str | None:
    """'yes' / 'no' from the first word ("Yes.", "NO, there is none"), else from a lone 'yes' or
    'no' anywhere ("There is no dog"); None when both or neither appear."""
    tokens = words(text)
    if not tokens:
        return None
    if tokens[0] in YES_WORDS:
        return "yes"
    if tokens[0] in NO_WORDS:
        return "no"
    has_yes, has_no = "yes" in tokens, "no" in tokens
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def strict_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a free-form answer picks, or None.

    Tried in order: a bare letter ("B", "(B)", "b."); a leading letter with a delimiter
    ("B. dog", "(B) dog", "B: dog", "B, because"); "the answer is B"; the option text itself, or the one
    option whose text the answer contains (ignoring options contained in a longer match).
    """
    stripped = text.strip()
    bare = stripped.strip(" \t\n.()[]:*'\"")
    if len(bare) == 1 and bare.upper() in options:
        return bare.upper()
    lead = re.match(r"^[(\[]?([A-Z])[)\].:,]\s*", stripped)
    if lead and lead.group(1) in options:
        return lead.group(1)
    said = re.search(r"answer(?:\s+is|:)\s*[(\[]?\**([A-Z])\**[)\]]?(?![A-Za-z])", stripped, re.IGNORECASE)
    if said and said.group(1).upper() in options:
        return said.group(1).upper()
    answer = normalize_text(stripped)
    if not answer:
        return None
    texts = {letter: normalize_text(str(option)) for letter, option in options.items()}
    equal = [letter for letter, option in texts.items() if option and option == answer]
    if len(equal) == 1:
        return equal[0]
    padded = f" {answer} "
    contained = [letter for letter, option in texts.items() if option and f" {option} " in padded]
    # "hot dog" contains "dog": keep only matches not inside another match.
    maximal = [a for a in contained
               if not any(b != a and f" {texts[a]} " in f" {texts[b]} " and texts[a] != texts[b] for b in contained)]
    return maximal[0] if len(maximal) == 1 else None
