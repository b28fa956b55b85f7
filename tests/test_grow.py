"""What a resumed run may not change: the checks behind a run that grows (the real runs are in
tests/test_start_row.py)."""

from __future__ import annotations

from cltk.grow import config_changes

CODE = {"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 40000}
BIBLE = {"name": "bible", "source": {"builtin": "kjv"}, "max_chars": 40000}
VERSE = {"name": "verse", "source": {"builtin": "shakespeare"}, "max_chars": 40000}


def test_config_changes_name_what_changed():
    old = {"seed": 1, "model": {"init_from": "m"}, "domains": [CODE, BIBLE]}
    assert config_changes(old, {**old, "domains": [CODE, BIBLE, VERSE]}) == []
    changed = config_changes(old, {**old, "seed": 2, "domains": [{**CODE, "max_chars": 5}]})
    assert changed == [
        "seed: 1 -> 2",
        "domains[0] (code).max_chars: 40000 -> 5",
        "domain 'bible' (domains[1]) was removed",
    ]
    # a key the old config predates is no change; a domain's source is compared whole
    assert (
        config_changes(
            old,
            {
                **old,
                "model": {"init_from": "m", "new_key": 1},
                "domains": [{**CODE, "weights": None}, BIBLE],
            },
        )
        == []
    )
    src = config_changes(
        old, {**old, "domains": [{**CODE, "source": {"builtin": "stdlib", "x": 1}}, BIBLE]}
    )
    assert src == [
        "domains[0] (code).source: {'builtin': 'stdlib'} -> {'builtin': 'stdlib', 'x': 1}"
    ]
    swapped = config_changes(old, {**old, "domains": [BIBLE, CODE]})
    assert swapped[0].startswith(
        "domains[0] was 'code' and is now 'bible' ('code' is now at domains[1])"
    )
