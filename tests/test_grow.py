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


def _config(tmp_path, domains, **sections):
    import yaml

    from cltk.validate import load_config
    from tests.tiny_run import write_tiny_run

    path = write_tiny_run(tmp_path, **sections)
    raw = yaml.safe_load(path.read_text())
    raw["domains"] = domains
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_check_config_refuses_changes_and_returns_appended_domains(tmp_path):
    import pytest
    import yaml

    from cltk.errors import UserError
    from cltk.grow import RunChangedError, check_config

    old = _config(tmp_path, [CODE, BIBLE])
    assert check_config(old) == []  # no run in output_dir yet
    old.out.mkdir(parents=True)
    (old.out / "config.yaml").write_text(yaml.safe_dump(old.to_dict()))
    assert check_config(old) == []
    assert check_config(_config(tmp_path, [CODE, BIBLE, VERSE])) == ["verse"]
    with pytest.raises(RunChangedError, match=r"domains\[1\] \(bible\).max_chars: 40000 -> 10"):
        check_config(_config(tmp_path, [CODE, {**BIBLE, "max_chars": 10}, VERSE]))
    assert issubclass(RunChangedError, UserError)
    with pytest.raises(RunChangedError, match="lora.base: frozen cannot grow"):
        check_config(_config(tmp_path, [CODE, BIBLE, VERSE], lora={"r": 4}))


def test_check_plan_names_the_stage_that_would_change(tmp_path):
    import numpy as np
    import pytest

    from cltk.grow import RunChangedError, check_plan
    from cltk.plan import Stage, plan_json

    def stages(n_code):
        return [
            Stage(0, "code", 0, 0, 1, np.arange(n_code)),
            Stage(1, "bible", 1, 0, 1, np.arange(5)),
        ]

    (tmp_path / "plan.json").write_text(plan_json(stages(10)[:1]))
    check_plan(
        tmp_path, stages(10)
    )  # the recorded stage first, a new one after it: a run that grows
    with pytest.raises(RunChangedError, match=r"stage 0 \(code\) .* sequences 10 -> 11"):
        check_plan(tmp_path, stages(11))
