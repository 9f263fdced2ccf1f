"""Answer metrics: exact match after normalisation, and ANLS as DocVQA defines it."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0.

    Args:
        prediction: the model's answer.
        references: the accepted answers.

    Returns:
        1.0 or 0.0.
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA).

    Both sides are lower-cased and stripped of surrounding and repeated whitespace. Per reference,
    the normalized distance is ``NL = distance / max(len)``; the score is ``1 - NL`` where
    ``NL < threshold`` and 0 otherwise (so a distance of exactly half scores 0, as in the published
    definition, Biten et al. 2019); the question's score is the best over its references.

    Args:
        prediction: the model's answer.
        references: the accepted answers.
        threshold: normalized distances at or above it score 0.

    Returns:
        The score in [0, 1].
    """
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in references:
        ref = " ".join(ref.lower().split())
        longest = max(len(pred), len(ref))
        distance = 0.0 if longest == 0 else levenshtein(pred, ref) / longest
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best
