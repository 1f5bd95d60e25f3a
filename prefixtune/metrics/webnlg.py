"""BLEU, METEOR and TER as the WebNLG 2017 challenge evaluation and DART's evaluation compute them.

WebNLG 2017 (the challenge's webnlg-automatic-evaluation, which DART's ``run_eval_on_webnlg.sh``
runs): every text is split on non-word characters, spaces collapsed, transliterated to ASCII
(``unidecode``) and lowercased. DART (``run_eval_on_dart.sh``): the references are the same
without transliteration (``dart_reference/all-delex-reference{0,1,2}.lex``); the script takes the
system output as it is, so prefixtune normalizes outputs like the references first (a no-op on
output that is already lowercased and tokenized, as the script expects). Then, for both:

* BLEU: Moses ``multi-bleu.perl`` with the first three references (missing ones are empty
  lines, i.e. references of length 0), closest reference length, no smoothing;
* METEOR 1.5 (``-l en -norm``) with the first three references (DART's ``-r 8`` pads those three
  with empty lines, which never score);
* TER: tercom 0.7.25 against the first three references; computed by sacrebleu's port of tercom.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter

from ..errors import PrefixTuneError
from .coco import meteor


def normalize(text: str, transliterate: bool = True) -> str:
    """The official normalization: tokens split on non-word characters, lowercase, ASCII (WebNLG only)."""
    text = " ".join(" ".join(re.split(r"(\W)", text)).split()).lower()
    if not transliterate:
        return text
    from unidecode import unidecode

    return unidecode(text)


def multi_bleu(references: list[list[str]], hypotheses: list[str]) -> float:
    """Moses multi-bleu.perl on whitespace-tokenized, lowercased text; a fraction in [0, 1].

    Args:
        references: Per segment, a fixed number of references ('' where a segment has fewer).
    """
    match, total = [0] * 5, [0] * 5
    hyp_length = ref_length = 0
    for hyp, refs in zip(hypotheses, references):
        words = hyp.lower().split()
        closest = None
        best: Counter = Counter()
        for ref in refs:
            ref_words = ref.lower().split()
            diff = abs(len(words) - len(ref_words))
            if (
                closest is None
                or diff < abs(len(words) - closest)
                or (diff == abs(len(words) - closest) and len(ref_words) < closest)
            ):
                closest = len(ref_words)
            for n in range(1, 5):
                grams = Counter(tuple(ref_words[i : i + n]) for i in range(len(ref_words) - n + 1))
                for g, c in grams.items():
                    best[g] = max(best[g], c)
        hyp_length += len(words)
        ref_length += closest or 0
        for n in range(1, 5):
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            total[n] += max(len(words) - n + 1, 0)
            match[n] += sum(min(c, best[g]) for g, c in grams.items())
    if hyp_length == 0 or any(match[n] == 0 or total[n] == 0 for n in range(1, 5)):
        return 0.0
    brevity = math.exp(1 - ref_length / hyp_length) if hyp_length < ref_length else 1.0
    return brevity * math.exp(sum(math.log(match[n] / total[n]) for n in range(1, 5)) / 4)


# Below this many segments TER runs in this process; above, in worker processes (one per core).
PARALLEL_TER_SEGMENTS = 400
# A worker: sacrebleu's TER statistics of the chunk it reads from stdin (a plain interpreter: no fork of
# a process holding torch's threads, no re-import of the caller's __main__, nothing but sacrebleu loaded)
_TER_WORKER = (
    "import json, sys\n"
    "from sacrebleu.metrics import TER\n"
    "hypotheses, streams = json.load(sys.stdin)\n"
    "score = TER().corpus_score(hypotheses, streams)\n"
    "print(json.dumps([score.num_edits, score.ref_length]))\n"
)


def ter(hypotheses: list[str], references: list[list[str]], workers: int | None = None) -> float:
    """Corpus TER (tercom's algorithm, sacrebleu's port) against up to 3 references per segment.

    Each segment's edits and reference length do not depend on the others, so long inputs are cut
    into one chunk per core, scored by parallel worker processes (sacrebleu's TER is pure Python:
    about 5 minutes for WebNLG's 1,862 test entries on one core) and the statistics summed: the
    same score as one call.
    """
    import json
    import subprocess
    import sys

    from sacrebleu.metrics import TER

    streams = [[rs[i] if i < len(rs) else None for rs in references] for i in range(3)]
    workers = min(workers or os.cpu_count() or 1, 16, max(1, len(hypotheses) // (PARALLEL_TER_SEGMENTS // 2)))
    if workers < 2 or len(hypotheses) < PARALLEL_TER_SEGMENTS:
        score = TER().corpus_score(hypotheses, streams)
        return score.score / 100
    size = math.ceil(len(hypotheses) / workers)
    procs = []
    for c in range(0, len(hypotheses), size):
        chunk = json.dumps([hypotheses[c : c + size], [stream[c : c + size] for stream in streams]])
        proc = subprocess.Popen(
            [sys.executable, "-c", _TER_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        proc.stdin.write(chunk.encode("utf-8"))
        proc.stdin.close()
        procs.append(proc)
    edits = length = 0.0
    for proc in procs:
        out, err = proc.stdout.read(), proc.stderr.read()
        if proc.wait():
            raise PrefixTuneError(f"TER worker failed: {err.decode(errors='replace')[-500:]}")
        chunk_edits, chunk_length = json.loads(out)
        edits, length = edits + chunk_edits, length + chunk_length
    if length > 0:
        return edits / length
    return 1.0 if edits > 0 else 0.0  # sacrebleu's rule for empty references


def webnlg_scores(references: list[list[str]], hypotheses: list[str], transliterate: bool = True) -> dict[str, float]:
    """``{"bleu", "meteor", "ter"}`` as fractions, computed on normalized texts (``transliterate``: WebNLG)."""
    hyps = [normalize(h, transliterate) for h in hypotheses]
    refs = [[normalize(r, transliterate) for r in rs] for rs in references]
    three = [(rs + ["", "", ""])[:3] for rs in refs]
    return {
        "bleu": multi_bleu(three, hyps),
        "meteor": meteor([rs[:3] for rs in refs], hyps),
        "ter": ter(hyps, [rs[:3] for rs in refs]),
    }
