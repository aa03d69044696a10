"""SQuAD-style answer scoring (Rajpurkar et al., 2016; as in MeZO's metrics): normalise (lower case,
drop punctuation, the articles a/an/the and extra whitespace), then token F1 and exact match,
each the best over the gold answers."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: tuple[str, ...] | list[str]) -> float:
    return max(token_f1(prediction, g) for g in golds)


def exact_match(prediction: str, golds: tuple[str, ...] | list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))
