"""METEOR 1.5, ROUGE-L and CIDEr as the MS-COCO caption code computes them (E2E's scorer uses it).

Texts are tokenized by the Stanford PTBTokenizer (lowercased, punctuation dropped) shipped in the
``pycocoevalcap`` wheel, then scored by that package's ROUGE-L and CIDEr(-D) and by its METEOR 1.5
jar (``-l en -norm``). Java is needed for the tokenizer and METEOR.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import PrefixTuneError

_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def package_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise PrefixTuneError("METEOR/CIDEr need the pycocoevalcap package: pip install pycocoevalcap")
    return Path(next(iter(spec.submodule_search_locations)))


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise PrefixTuneError("METEOR and the PTB tokenizer need Java (a JRE 8+) on PATH")
    return java


def ptb_tokenize(texts: list[str]) -> list[str]:
    """The COCO caption code's PTBTokenizer: one lowercased, punctuation-free string per text."""
    jar = package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(t.replace("\n", " ") for t in texts))
    try:
        cmd = [
            require_java(),
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            f.name,
        ]
        out = subprocess.run(cmd, capture_output=True, check=True).stdout.decode("utf-8")
    except subprocess.CalledProcessError as e:
        raise PrefixTuneError(f"PTBTokenizer failed: {e.stderr.decode(errors='replace').strip()[:300]}") from None
    finally:
        os.unlink(f.name)
    lines = out.split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATION) for line in lines[: len(texts)]]


def meteor(references: list[list[str]], hypotheses: list[str]) -> float:
    """Corpus METEOR 1.5 (``-l en -norm``) from the jar's aggregate of all segments' statistics."""
    jar = package_dir() / "meteor" / "meteor-1.5.jar"
    cmd = [require_java(), "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    lines = []
    for hyp, refs in zip(hypotheses, references):
        hyp = hyp.replace("|||", "").replace("  ", " ")
        lines.append(" ||| ".join(["SCORE", " ||| ".join(refs), hyp]))
    proc = subprocess.Popen(cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stats = []
    for line in lines:  # one SCORE line at a time: the jar answers each with its statistics
        proc.stdin.write((line + "\n").encode("utf-8"))
        proc.stdin.flush()
        stats.append(proc.stdout.readline().decode("utf-8").strip())
    proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
    proc.stdin.flush()
    for _ in stats:
        proc.stdout.readline()  # per-segment scores
    final = proc.stdout.readline().decode("utf-8").strip()
    proc.stdin.close()
    proc.wait()
    try:
        return float(final)
    except ValueError:
        err = proc.stderr.read().decode(errors="replace").strip()[:300]
        raise PrefixTuneError(f"METEOR failed: {err or final!r}") from None


def coco_scores(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """METEOR, ROUGE-L and CIDEr on PTB-tokenized texts, as the E2E scorer reports them."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    flat = [r for refs in references for r in refs]
    tokens = ptb_tokenize(flat + list(hypotheses))
    refs_tok, hyps_tok, i = {}, {}, 0
    for k, refs in enumerate(references):
        refs_tok[k] = tokens[i : i + len(refs)]
        i += len(refs)
    for k in range(len(hypotheses)):
        hyps_tok[k] = [tokens[len(flat) + k]]
    return {
        "meteor": meteor([refs_tok[k] for k in refs_tok], [hyps_tok[k][0] for k in hyps_tok]),
        "rouge_l": float(Rouge().compute_score(refs_tok, hyps_tok)[0]),
        "cider": float(Cider().compute_score(refs_tok, hyps_tok)[0]),
    }
