"""The text_similarity metrics, each a float in [0, 1].

The libraries are imported on first use: sacrebleu and rouge-score (with nltk) take most of a
second to import, and the api validates graders without ever scoring one.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from app.graders.schemas import SimilarityMetric

ROUGE_TYPES = {
    SimilarityMetric.ROUGE_1: "rouge1",
    SimilarityMetric.ROUGE_2: "rouge2",
    SimilarityMetric.ROUGE_3: "rouge3",
    SimilarityMetric.ROUGE_4: "rouge4",
    SimilarityMetric.ROUGE_5: "rouge5",
    SimilarityMetric.ROUGE_L: "rougeL",
}
WORD = re.compile(r"[^\W_]+")


class _WordTokenizer:
    """rouge-score's default tokenizer lowercases and keeps [a-z0-9] runs, so any word outside
    ASCII vanishes ("café" -> "caf", Greek or Cyrillic text -> nothing, ROUGE 0). This one is the
    same on ASCII text and keeps every letter and digit."""

    def tokenize(self, text: str) -> list[str]:
        return WORD.findall(text.lower())


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))  # sacrebleu gives 100.00000000000004 for a perfect match


def fuzzy_match(text: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return _clamp(fuzz.ratio(text, reference) / 100.0)


def bleu(text: str, reference: str) -> float:
    import sacrebleu

    return _clamp(sacrebleu.sentence_bleu(text, [reference]).score / 100.0)


@functools.cache
def _rouge_scorer(rouge_type: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([rouge_type], tokenizer=_WordTokenizer())


def rouge(metric: SimilarityMetric, text: str, reference: str) -> float:
    rouge_type = ROUGE_TYPES[metric]
    # rouge-score's argument order is (target, prediction); the F-measure is symmetric anyway.
    scores = _rouge_scorer(rouge_type).score(reference, text)
    return _clamp(float(scores[rouge_type].fmeasure))


def similarity(metric: SimilarityMetric, text: str, reference: str) -> float:
    if metric is SimilarityMetric.FUZZY_MATCH:
        return fuzzy_match(text, reference)
    if metric is SimilarityMetric.BLEU:
        return bleu(text, reference)
    return rouge(metric, text, reference)
