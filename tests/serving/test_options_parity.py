"""One GenerationOptions everywhere (issue 15, point 2): every option behaves alike on every path.

For each decoding option, on a decoder-only and two encoder-decoder families, the server's answer
equals offline ``decode_texts`` (the ``generate`` CLI's path) with the same seed; the HTTP schema, the
CLI flags and the engine are all made from :class:`prefixtune.GenerationOptions`.
"""

from dataclasses import fields

import pytest
import torch
from fastapi.testclient import TestClient
from tiny import make_model

from prefixtune import GenerationOptions, PrefixConfig, PrefixTuneError
from prefixtune.cli import build_parser
from prefixtune.decode import decode_texts
from prefixtune.serving.app import ServerSettings, create_app

TEXTS = ["name : The Vaults | eatType : pub", "food : English | area : riverside", "q"]
CASES = {
    "greedy": {},
    "sampling": {"do_sample": True, "seed": 11},
    "temperature": {"do_sample": True, "seed": 5, "temperature": 0.7},
    "top_k": {"do_sample": True, "seed": 5, "top_k": 5},
    "top_p": {"do_sample": True, "seed": 5, "top_p": 0.8, "temperature": 1.5},
    "beam": {"num_beams": 3},
    "beam_length_penalty": {"num_beams": 4, "length_penalty": 2.0, "early_stopping": True},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
    "repetition_penalty": {"repetition_penalty": 3.0},
    "min_new_tokens": {"min_new_tokens": 7},
    "max_new_tokens": {"max_new_tokens": 3},
}


@pytest.fixture(scope="module", params=["llama", "t5", "bart"])
def served(request, tmp_path_factory):
    model, tok = make_model(family=request.param, seed=2 if request.param == "bart" else 0)  # bart seed 0 ends at once
    directory = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(1)
    model.add_prefix("p", PrefixConfig(num_virtual_tokens=4, init_std=0.5))
    model.save_prefix(directory / "p", name="p")
    model.remove_prefix("p")
    app = create_app(model, tok, directory, ServerSettings())
    app.state.registry.load_all()
    with TestClient(app) as client:
        yield client, model, tok


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_option_gives_the_server_the_offline_answer(served, case):
    client, model, tok = served
    options = {"max_new_tokens": 10, **CASES[case]}
    outputs = []
    for text in TEXTS:
        offline = decode_texts(model, tok, [text], "p", options=options)[0]
        r = client.post("/v1/generate", json={"prefix": "p", "inputs": text, **options})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == [offline], (case, text)
        outputs.append(offline)
    assert any(outputs), "only empty outputs: the comparison would be vacuous"


def test_options_change_the_output_somewhere(served):
    """The cases above are not vacuous: each option changes some output from greedy decoding."""
    client, model, tok = served
    greedy = decode_texts(model, tok, TEXTS, "p", options={"max_new_tokens": 10})
    for case, extra in CASES.items():
        if case in ("greedy", "beam", "beam_length_penalty", "min_new_tokens"):
            continue  # beams may agree with greedy on a random tiny model, which never ends early anyway
        other = decode_texts(model, tok, TEXTS, "p", options={"max_new_tokens": 10, **extra})
        assert other != greedy, case


def test_stop_strings_cut_alike_offline_and_in_the_server(served):
    client, model, tok = served
    full = decode_texts(model, tok, TEXTS[:1], "p", options={"max_new_tokens": 12})[0]
    stop = full[3:5] if len(full) > 5 else full[-1:]
    offline = decode_texts(model, tok, TEXTS[:1], "p", options={"max_new_tokens": 12, "stop": [stop]})[0]
    assert offline == full[: full.find(stop)].strip()
    r = client.post("/v1/generate", json={"prefix": "p", "inputs": TEXTS[0], "max_new_tokens": 12, "stop": stop})
    assert r.json()["outputs"] == [offline]


def test_openai_completions_map_onto_the_same_options(served):
    client, model, tok = served
    sampled = {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 4, "max_new_tokens": 6}
    r = client.post(
        "/v1/completions",
        json={"model": "p", "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0.9, "top_p": 0.9, "seed": 4},
    )
    assert r.json()["choices"][0]["text"] == decode_texts(model, tok, TEXTS[:1], "p", options=sampled)[0]


def test_schema_and_flags_are_made_from_the_options(tmp_path):
    http = {f.name for f in fields(GenerationOptions) if f.metadata["http"]}
    flags = {f.name for f in fields(GenerationOptions) if f.metadata["flag"]}
    model, tok = make_model()
    app = create_app(model, tok, tmp_path, ServerSettings())
    schema = app.openapi()["components"]["schemas"]["GenerateBody"]["properties"]
    assert http <= set(schema)
    assert schema["temperature"]["minimum"] == 1e-4 and schema["top_p"]["exclusiveMinimum"] == 0
    generate = build_parser().parse_args(["generate", "--prefix", "x"])
    assert flags <= set(vars(generate))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prefix", "x", "--temperature", "0"])


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 0.0},
        {"top_p": 0.0},
        {"seed": -1},
        {"seed": 2**64},
        {"num_beams": 0},
        {"num_beams": 2, "do_sample": True},
    ],
)
def test_out_of_bounds_options_are_refused_everywhere(bad):
    with pytest.raises(PrefixTuneError):
        GenerationOptions(**bad)
