"""Readers for the release formats of the paper's tasks (§5.1), each linearized as in the paper.

* E2E CSV (``mr,ref``): ``name[The Vaults], eatType[pub]`` → ``name : The Vaults | eatType : pub``.
* WebNLG 2017 challenge XML (and its JSON conversion), DART JSON and XML: triples →
  ``subject : predicate : object | ...`` with underscores turned into spaces.
* Summarization: ``{split}.source`` / ``{split}.target`` line files.
* Generic JSONL: ``{"source": ..., "target": ...}`` or ``"targets": [...]``.

Every example records ``file:line`` (or ``file:entry``) so errors can name it.
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .errors import PrefixTuneError

_E2E_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[(.*?)\]\s*(?:,|$)")


@dataclass(frozen=True)
class Example:
    """One (source, target) pair.

    Attributes:
        source: The linearized input text.
        target: One reference text.
        origin: Where it was read from (``file:line`` or ``file:entry N``).
        category: The WebNLG category ('' elsewhere).
    """

    source: str
    target: str
    origin: str
    category: str = ""


def read_text(path: Path) -> str:
    """A UTF-8 file's text, with errors naming the file (and line, for bad bytes)."""
    if not path.is_file():
        raise PrefixTuneError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise PrefixTuneError(f"{path}:{line}: not UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise PrefixTuneError(f"{path}: file is empty")
    return text


def read_jsonl(path: Path) -> list[Example]:
    """``{"source": ..., "target": ...}`` or ``{"source": ..., "targets": [...]}`` per line."""
    examples = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrefixTuneError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("source"), str):
            raise PrefixTuneError(f"{where}: needs a string field 'source'")
        targets = obj.get("targets", [obj["target"]] if "target" in obj else None)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise PrefixTuneError(f"{where}: needs a string 'target' or a non-empty list of strings 'targets'")
        examples.extend(Example(obj["source"], t, where) for t in targets)
    return examples


def linearize_e2e(mr: str) -> str:
    """``name[The Vaults], eatType[pub]`` → ``name : The Vaults | eatType : pub``."""
    slots = _E2E_SLOT.findall(mr)
    if not slots:
        raise ValueError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{key} : {value}" for key, value in slots)


def read_e2e(path: Path) -> list[Example]:
    """An E2E CSV file with header ``mr,ref`` (one row per reference), or ``MR`` alone (test inputs)."""
    reader = csv.reader(read_text(path).splitlines())
    header = [h.strip().lower() for h in next(reader)]
    sources_only = header == ["mr"]
    if header[:2] != ["mr", "ref"] and not sources_only:
        raise PrefixTuneError(f"{path}:1: expected header 'mr,ref' (or 'MR' alone), got {','.join(header)!r}")
    examples = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if sources_only:
            row = [row[0], ""] if row else row
        if len(row) < 2:
            raise PrefixTuneError(f"{where}: expected 2 columns (mr, ref), got {len(row)}")
        try:
            source = linearize_e2e(row[0])
        except ValueError as e:
            raise PrefixTuneError(f"{where}: {e}") from None
        examples.append(Example(source, row[1].strip(), where))
    return examples


def linearize_triples(triples: list[tuple[str, str, str]]) -> str:
    """[(s, p, o), ...] → ``s : p : o | ...`` with underscores as spaces (the paper's format)."""
    return " | ".join(" : ".join(part.strip().replace("_", " ") for part in triple) for triple in triples)


def _xml_entries(path: Path):
    try:
        root = ET.fromstring(read_text(path))
    except ET.ParseError as e:
        raise PrefixTuneError(f"{path}:{e.position[0]}: malformed XML ({e})") from None
    return list(root.iter("entry"))


def read_triples_xml(path: Path) -> list[Example]:
    """WebNLG challenge XML or DART XML: ``<entry>`` with ``<mtriple>`` and ``<lex>`` elements."""
    examples = []
    for number, entry in enumerate(_xml_entries(path), start=1):
        where = f"{path}:entry {number}"
        triples = []
        for mtriple in entry.iter("mtriple"):
            parts = (mtriple.text or "").split(" | ")
            if len(parts) != 3:
                raise PrefixTuneError(f"{where}: triple {mtriple.text!r} is not 'subject | predicate | object'")
            triples.append(tuple(parts))
        if not triples:
            raise PrefixTuneError(f"{where}: no <mtriple> in <modifiedtripleset>")
        source = linearize_triples(triples)
        category = entry.get("category", "")
        lexes = [(lex.text or "").strip() for lex in entry.iter("lex")]
        examples.extend(Example(source, text, where, category) for text in lexes or [""])
    return examples


def read_webnlg_json(path: Path) -> list[Example]:
    """The JSON conversion of WebNLG (``{"entries": [{"1": {...}}, ...]}``)."""
    try:
        entries = json.loads(read_text(path))["entries"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PrefixTuneError(f"{path}: not a WebNLG JSON file ({e})") from None
    examples = []
    for number, wrapper in enumerate(entries, start=1):
        entry = next(iter(wrapper.values()))
        where = f"{path}:entry {number}"
        triples = [(t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]]
        source = linearize_triples(triples)
        lexes = [lex["lex"].strip() for lex in entry.get("lexicalisations", [])]
        examples.extend(Example(source, text, where, entry.get("category", "")) for text in lexes or [""])
    return examples


def read_dart_json(path: Path) -> list[Example]:
    """DART JSON: a list of ``{"tripleset": [[s, p, o], ...], "annotations": [{"text": ...}]}``."""
    try:
        entries = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise PrefixTuneError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(entries, list):
        raise PrefixTuneError(f"{path}: expected a JSON list of DART entries")
    examples = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path}:entry {number}"
        if not isinstance(entry, dict) or "tripleset" not in entry:
            raise PrefixTuneError(f"{where}: missing field 'tripleset'")
        source = linearize_triples([tuple(t) for t in entry["tripleset"]])
        texts = [a["text"].strip() for a in entry.get("annotations", [])]
        examples.extend(Example(source, text, where) for text in texts or [""])
    return examples


def read_line_pairs(source_path: Path, target_path: Path) -> list[Example]:
    """Summarization line files: line i of ``.source`` pairs with line i of ``.target``."""
    sources = read_text(source_path).splitlines()
    targets = read_text(target_path).splitlines()
    if len(sources) != len(targets):
        raise PrefixTuneError(
            f"{target_path}: {len(targets)} lines but {source_path} has {len(sources)}; they must pair line by line"
        )
    return [Example(s, t, f"{source_path}:{i}") for i, (s, t) in enumerate(zip(sources, targets), start=1)]
