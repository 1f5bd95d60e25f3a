"""Data loading (issue 2, point 13) on the real E2E release in ../shared/data."""

import json

import pytest
from paths import E2E
from tiny import tiny_tokenizer

from prefixtune import PrefixTuneError
from prefixtune.data import Example, group_references, load_examples, subset
from prefixtune.features import Formatter, collate
from prefixtune.formats import linearize_e2e


@pytest.mark.parametrize("split, rows, sources", [("train", 42061, 4862), ("dev", 4672, 547), ("test", 4693, 630)])
def test_e2e_counts_match_the_release(split, rows, sources):
    examples = load_examples("e2e", E2E, split)
    assert len(examples) == rows
    assert len({e.source for e in examples}) == sources


def test_e2e_test_inputs_without_references():
    examples = load_examples("e2e", E2E / "testset.csv")
    assert len(examples) == 630 and all(e.target == "" for e in examples)
    with_refs = load_examples("e2e", E2E, "test")
    assert [e.source for e in examples] == list(dict.fromkeys(e.source for e in with_refs))


def test_e2e_linearization_as_in_the_paper():
    first = load_examples("e2e", E2E / "trainset.csv")[0]
    assert first.source == (
        "name : The Vaults | eatType : pub | priceRange : more than £30 | "
        "customer rating : 5 out of 5 | near : Café Adriatic"
    )
    assert first.target.startswith("The Vaults pub near Café Adriatic")
    assert first.origin.endswith("trainset.csv:2")
    assert linearize_e2e("name[Alimentum], area[city centre]") == "name : Alimentum | area : city centre"


def test_subset_is_reproducible_and_seeded():
    examples = load_examples("e2e", E2E / "devset.csv")
    a, b, c = subset(examples, 50, 1), subset(examples, 50, 1), subset(examples, 50, 2)
    assert a == b and a != c and len(a) == 50
    with pytest.raises(PrefixTuneError, match="--train-size"):
        subset(examples, 10**6)


def test_jsonl_target_and_targets(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"source": "a", "target": "b"}) + "\n\n" + json.dumps({"source": "c", "targets": ["d", "e"]}) + "\n"
    )
    assert load_examples("jsonl", path) == [
        Example("a", "b", f"{path}:1"),
        Example("c", "d", f"{path}:3"),
        Example("c", "e", f"{path}:3"),
    ]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b'{"source": "a"}\n', ":1: needs a string 'target'"),
        (b'{"source": "a", "target": "b"}\n{oops\n', ":2: invalid JSON"),
        (b'{"target": "b"}\n', ":1: needs a string field 'source'"),
        (b'{"source": "\xff", "target": "b"}\n', ":1: not UTF-8"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(PrefixTuneError, match=match):
        load_examples("jsonl", path)


def test_bad_e2e_and_missing_files(tmp_path):
    (tmp_path / "x.csv").write_text("meaning,text\na,b\n")
    with pytest.raises(PrefixTuneError, match="x.csv:1: expected header 'mr,ref'"):
        load_examples("e2e", tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text('mr,ref\n"name[A]"\n')
    with pytest.raises(PrefixTuneError, match="y.csv:2: expected 2 columns"):
        load_examples("e2e", tmp_path / "y.csv")
    with pytest.raises(PrefixTuneError, match="not found"):
        load_examples("e2e", tmp_path / "none.csv")
    with pytest.raises(PrefixTuneError, match="unknown task 'xml'"):
        load_examples("xml", tmp_path)


def test_loss_only_on_target_tokens():
    tok = tiny_tokenizer()
    fmt = Formatter(tok, is_encoder_decoder=False, context=512, prefix_len=5)
    f = fmt.encode(Example("name : The Vaults", "The Vaults pub.", "x:1"))
    source = tok("name : The Vaults", add_special_tokens=False)["input_ids"]
    target = tok("The Vaults pub.", add_special_tokens=False)["input_ids"]
    assert f.input_ids == source + [tok.bos_token_id] + target + [tok.eos_token_id]
    assert f.labels == [-100] * (len(source) + 1) + target + [tok.eos_token_id]
    batch = collate([f, fmt.encode(Example("a", "b", "x:2"))], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][1].sum()) == len(fmt.encode(Example("a", "b", "")).input_ids)


def test_too_long_input_errors_unless_truncated():
    tok = tiny_tokenizer()
    long = Example("name : The Vaults " * 40, "ok", "data.jsonl:7")
    with pytest.raises(PrefixTuneError, match="data.jsonl:7: .* exceed the model's context of 64; .*--truncate"):
        Formatter(tok, False, context=64, prefix_len=5).encode(long)
    f = Formatter(tok, False, context=64, prefix_len=5, truncate=True).encode(long)
    assert len(f.input_ids) + 5 <= 64


WEBNLG = E2E.parent / "webnlg2017"
DART = E2E.parent / "dart"


@pytest.mark.parametrize(
    "split, entries, references",
    [
        ("train", 6940, 18102),
        ("dev", 872, 2268),
        ("test", 1862, 4928),
        ("test_unseen", 891, 2433),
        ("test_seen", 971, 2495),
    ],
)
def test_webnlg_counts_match_the_release(split, entries, references):
    examples = load_examples("webnlg", WEBNLG, split)
    assert len({e.origin for e in examples}) == entries
    assert len(examples) == references


def test_webnlg_test_inputs_without_lexicalisations():
    examples = load_examples("webnlg", WEBNLG / "test" / "testdata_no_lex.xml")
    assert len(examples) == 1862 and all(e.target == "" for e in examples)


def test_webnlg_json_conversion_matches_the_xml():
    from_json = load_examples("webnlg", WEBNLG / "dev.json")
    from_xml = load_examples("webnlg", WEBNLG, "dev")
    assert len({e.origin for e in from_json}) == 872
    assert sorted((e.source, e.target) for e in from_json) == sorted((e.source, e.target) for e in from_xml)


def test_webnlg_linearization_as_in_the_paper():
    first = load_examples("webnlg", WEBNLG, "test")[0]
    assert first.source == "Abilene Regional Airport : cityServed : Abilene, Texas"
    assert first.category == "Airport"


@pytest.mark.parametrize(
    "path, entries, references",
    [
        ("v1.1.1/dart-v1.1.1-full-dev.json", 2768, 6980),
        ("v1.1.1/dart-v1.1.1-full-dev.xml", 2768, 6980),
        ("v1.1.1/dart-v1.1.1-full-test.xml", 5097, 12552),
    ],
)
def test_dart_counts_match_the_release(path, entries, references):
    examples = load_examples("dart", DART / path)
    assert len({e.origin for e in examples}) == entries
    assert len(examples) == references


def test_dart_json_and_xml_agree_and_splits_resolve_in_the_folder():
    from_json = load_examples("dart", DART, "dev")
    from_xml = load_examples("dart", DART / "v1.1.1/dart-v1.1.1-full-dev.xml")
    assert [(e.source, e.target) for e in from_json] == [(e.source, e.target) for e in from_xml]
    assert (
        from_json[0].source
        == "Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : Mars Hill, North Carolina"
    )
    assert len(load_examples("dart", DART, "test")) == 12552


def test_grouping_gives_one_item_per_unique_source_in_first_appearance_order():
    examples = load_examples("e2e", E2E, "test")
    groups = group_references(examples)
    assert len(groups) == 630 and sum(len(r) for _, r in groups) == 4693
    assert [s for s, _ in groups] == list(dict.fromkeys(e.source for e in examples))


def test_summarization_line_files_and_jsonl(tmp_path):
    (tmp_path / "test.source").write_text("doc one\ndoc two\n")
    (tmp_path / "test.target").write_text("sum one\nsum two\n")
    examples = load_examples("xsum", tmp_path, "test")
    assert [(e.source, e.target) for e in examples] == [("doc one", "sum one"), ("doc two", "sum two")]
    (tmp_path / "dev.source").write_text("a\nb\n")
    (tmp_path / "dev.target").write_text("a\n")
    with pytest.raises(PrefixTuneError, match="dev.target: 1 lines but .*dev.source has 2"):
        load_examples("xsum", tmp_path, "dev")
    (tmp_path / "train.jsonl").write_text('{"source": "d", "target": "s"}\n')
    assert load_examples("xsum", tmp_path, "train")[0].target == "s"
