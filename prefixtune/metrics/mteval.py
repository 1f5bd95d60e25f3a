"""BLEU and NIST as the E2E challenge scorer computes them (mteval-v13a, variable references).

The E2E metrics package runs NIST's ``mteval-v13a.pl``, edited to accept a different number of
references per segment. This is a re-implementation of that computation: its tokenization
(``tokenization`` with ASCII lowercasing), n-gram information weights from all references, BLEU
with the closest reference length and the script's smoothing, and NIST whose length penalty
compares the output's words with the average reference length: total reference words divided by
the mean number of non-empty references per segment (the E2E edit of the script, e2e-metrics
commit fdfe692; dividing by the largest number of references instead makes the average reference
far too short and the penalty almost never apply).
"""

from __future__ import annotations

import math
import re
from collections import Counter

_MAX_N = 9  # the script counts n-grams up to 9; BLEU reads n ≤ 4, NIST n ≤ 5
_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def tokenize(text: str) -> list[str]:
    """mteval-v13a's default (non-international) tokenization, lowercased as without ``-c``."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} ".translate(_UPPER)
    text = _PUNCT.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", text)
    text = re.sub(r"([\.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return text.split()


def _ngrams(words: list[str]) -> Counter:
    counts: Counter = Counter()
    for i in range(len(words)):
        for n in range(1, min(_MAX_N, len(words) - i) + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _closest(current: int, ref: int, hyp: int) -> int:
    """The script's ``brevity_penalty_closest``: ties go to the shorter; empty references are skipped."""
    if not ref:
        return current
    if abs(hyp - ref) < abs(hyp - current) or (abs(hyp - ref) == abs(hyp - current) and ref < current):
        return ref
    return current


def bleu_nist(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """Corpus BLEU (4-gram, smoothed as the script) and NIST (5-gram).

    Args:
        references: Per segment, its references (any number ≥ 1).
        hypotheses: One system output per segment.

    Returns:
        ``{"bleu": fraction, "nist": score}``.
    """
    refs = [[tokenize(r) for r in rs] for rs in references]
    hyps = [tokenize(h) for h in hypotheses]
    counts: Counter = Counter()
    total_words = 0
    for segment in refs:
        for ref in segment:
            total_words += len(ref)
            counts.update(_ngrams(ref))
    info = {g: -math.log2(c / counts[g[:-1]] if len(g) > 1 else c / total_words) for g, c in counts.items()}
    match, test, ref_count = [0] * (_MAX_N + 1), [0] * (_MAX_N + 1), [0] * (_MAX_N + 1)
    test_info = [0.0] * (_MAX_N + 1)
    ref_length = 0
    for hyp, segment in zip(hyps, refs):
        best: Counter = Counter()
        length = None
        for ref in segment:
            for gram, c in _ngrams(ref).items():
                best[gram] = max(best[gram], c)
            for n in range(1, _MAX_N + 1):
                ref_count[n] += max(len(ref) - n + 1, 0)
            length = len(ref) if length is None else _closest(length, len(ref), len(hyp))
        ref_length += length
        for n in range(1, _MAX_N + 1):
            test[n] += max(len(hyp) - n + 1, 0)
        for gram, c in _ngrams(hyp).items():
            if gram in best:
                matched = min(c, best[gram])
                match[len(gram)] += matched
                test_info[len(gram)] += info[gram] * matched
    # the script's $nrefs: references that are not empty once tokenized, averaged over segments
    mean_refs = sum(sum(1 for ref in segment if ref) for segment in refs) / len(refs)
    return {"bleu": _bleu(ref_length, match, test), "nist": _nist(mean_refs, test, ref_count, test_info)}


def _bleu(ref_length: int, match: list[int], test: list[int]) -> float:
    brevity = math.exp(min(0.0, 1 - ref_length / test[1])) if test[1] > 0 else 0.0
    total, smooth = 0.0, 1
    for n in range(1, 5):
        if test[n] == 0:
            log_p = 0.0
        elif match[n] == 0:
            smooth *= 2
            log_p = math.log(1 / (smooth * test[n]))
        else:
            log_p = math.log(match[n] / test[n])
        total += log_p
    return math.exp(total / 4) * brevity


def _nist(mean_refs: float, test: list[int], ref_count: list[int], test_info: list[float]) -> float:
    """The script's ``nist_score``: information per matched n-gram (n ≤ 5) times the length penalty."""
    if ref_count[1] == 0:  # every reference empty: the script divides by zero; no length to compare with
        return 0.0
    ratio = test[1] / (ref_count[1] / mean_refs)
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        beta = -math.log(0.5) / math.log(1.5) ** 2
        penalty = math.exp(-beta * math.log(ratio) ** 2)
    return sum(test_info[n] / max(test[n], 1) for n in range(1, 6)) * penalty
