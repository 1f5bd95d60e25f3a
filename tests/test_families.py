"""Every causal-LM and encoder-decoder family of the installed transformers (issue 15, point 4).

Each family is built from a shrunk default config and run through the oracles of
``tests/families.py``; its status must be the one recorded in ``tests/data/families.json`` (the
README's support table, ``docs/families.md``, is written from the same record). A family that gets
supported, refused or broken by a change fails here until the table is regenerated with
``python tests/families.py``.
"""

import json

import pytest
from families import RECORD, TABLE, check, families

ROWS = {row["family"]: row for row in json.loads(RECORD.read_text())}


def test_the_record_covers_every_family_of_the_installed_transformers():
    assert sorted(ROWS) == families()
    table = TABLE.read_text()
    assert all(f"| {name} |" in table for name in ROWS)


@pytest.mark.parametrize("family", sorted(ROWS))
def test_family_status_is_the_recorded_one(family):
    got = check(family)
    want = ROWS[family]
    assert got["status"] == want["status"], got


def test_refusals_happen_at_wrap_and_name_the_reason():
    refused = [row for row in ROWS.values() if row["status"] == "refused"]
    assert refused and all(row["note"] for row in refused)
    assert sum(row["status"] == "supported" for row in ROWS.values()) >= 100


def test_no_family_fails_every_one_is_supported_or_refused_at_wrap():
    assert [name for name, row in ROWS.items() if row["status"] == "fails"] == []
