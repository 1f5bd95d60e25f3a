"""`prefixtune data download` (issue 3, point 2): SHA-256 checked, atomic, clear offline error."""

import shutil

import pytest
from paths import E2E

from prefixtune import PrefixTuneError
from prefixtune.cli import main
from prefixtune.data import load_examples
from prefixtune.download import download, manifest, sha256


def test_manifest_matches_the_shared_copies():
    for item in manifest()["e2e"]["files"]:
        assert sha256(E2E / item["path"]) == item["sha256"]


def test_download_from_a_mirror_checks_every_file(tmp_path):
    folder = download("e2e", tmp_path / "root", base_url=E2E.as_uri())
    assert sorted(p.name for p in folder.iterdir()) == [
        "devset.csv",
        "testset.csv",
        "testset_w_refs.csv",
        "trainset.csv",
    ]
    assert len(load_examples("e2e", folder, "dev")) == 4672


def test_a_corrupted_mirror_saves_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(E2E, mirror, ignore=shutil.ignore_patterns("metrics-example"))
    (mirror / "devset.csv").write_text("mr,ref\n")
    with pytest.raises(PrefixTuneError, match="devset.csv: SHA-256 .* does not match"):
        download("e2e", tmp_path / "root", base_url=mirror.as_uri())
    assert not (tmp_path / "root" / "e2e" / "devset.csv").exists()


def test_offline_gives_a_clear_one_line_error(tmp_path, capsys):
    code = main(["data", "download", "dart", "--to", str(tmp_path), "--base-url", "http://127.0.0.1:9/"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "may be offline" in err and "--data PATH or set PREFIXTUNE_DATA" in err and "\n" not in err


def test_data_root_from_prefixtune_data(monkeypatch):
    from prefixtune.cli.common import data_path

    monkeypatch.setenv("PREFIXTUNE_DATA", str(E2E.parent))
    assert data_path(None, "webnlg") == str(E2E.parent / "webnlg2017")
    assert len(load_examples("e2e", data_path(None, "e2e"), "dev")) == 4672
    assert data_path("mine.jsonl", "e2e") == "mine.jsonl"  # --data wins
    monkeypatch.delenv("PREFIXTUNE_DATA")
    with pytest.raises(PrefixTuneError, match="--data is required"):
        data_path(None, "e2e")
