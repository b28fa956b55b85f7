"""Replay: its config refusals, the reservoir (algorithm R against its theory, on disk), the mixes each
stage gets, general sources prepared like domains, and one short 1-rank run that is killed and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cltk.config import ConfigError
from cltk.data.windows import TokenWindows
from cltk.methods.replay import reservoir as res
from cltk.validate import load_config
from tests.tiny_run import write_tiny_run

CODE = {"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 40000}
BIBLE = {"name": "bible", "source": {"builtin": "kjv"}, "max_chars": 40000}
HELD = {"name": "held", "source": {"builtin": "kjv"}, "max_chars": 30000, "eval_only": True}
WEB = {"name": "web", "source": {"builtin": "shakespeare"}, "max_chars": 20000}


def _load(tmp_path: Path, replay: dict, **sections):
    path = write_tiny_run(tmp_path, domains=[CODE, BIBLE, HELD], replay=replay, **sections)
    return load_config(path, world_size=1)


@pytest.mark.parametrize(
    "replay, sections, key, words",
    [
        ({"share": 1.0}, {}, "replay.share", "[0, 1)"),
        ({"shares": [0, 0.1, 0.2]}, {}, "replay.shares", "3 entries but the run has 2 stages"),
        ({"shares": [0, 0.1]}, {"blocks": {"k": 2}}, "replay.shares", "the run has 4 stages"),
        ({"shares": [0, 1.5]}, {}, "replay.shares[1]", "[0, 1)"),
        ({"shares": [0.1, 0.1]}, {}, "replay.shares[0]", "no earlier stage"),
        ({"share": 0.1, "shares": [0, 0.1]}, {}, "replay.shares", "not both"),
        ({"share": 0.5, "general": [WEB], "general_share": 0.5}, {}, "replay.general_share",
         "below 1"),
        ({"general": [WEB], "general_shares": [0.1]}, {}, "replay.general_shares",
         "1 entries but the run has 2"),
        ({"shares": [0, 0.5], "general": [WEB], "general_shares": [0.1, 0.6]}, {},
         "replay.general_shares", "stage 1 would mix 1.1"),
        ({"general": [WEB]}, {}, "replay.general_share", "share is 0"),
        ({"general_share": 0.1}, {}, "replay.general", "needs sources"),
        ({"general": [{**WEB, "source": {"builtin": "nope"}}], "general_share": 0.1}, {},
         "replay.general[0].source", "nope"),
        ({"general": [{**WEB, "name": "a b"}], "general_share": 0.1}, {}, "replay.general[0].name",
         "letters"),
        ({"general": [WEB, WEB], "general_share": 0.1}, {}, "replay.general[1]", "twice"),
        ({"general": [{"domain": "bible"}], "general_share": 0.1}, {}, "replay.general[0].domain",
         "training domain"),
        ({"general": [{"domain": "nope"}], "general_share": 0.1}, {}, "replay.general[0].domain",
         "no domain"),
        ({"general": [{**WEB, "domain": "held"}], "general_share": 0.1}, {}, "replay.general[0]",
         "not both"),
        ({"share": 0.1, "memory": -1}, {}, "replay.memory", ">= 0"),
        ({"memory": 10}, {}, "replay.memory", "needs replay.share"),
    ],
)
def test_bad_replay_settings_are_refused_at_load_naming_the_key(tmp_path, replay, sections, key,
                                                                 words):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, replay, **sections)
    assert e.value.key == key
    assert words in str(e.value)


def test_good_settings_load_and_give_the_share_of_every_stage(tmp_path):
    r = _load(tmp_path, {"shares": [0, 0.25], "memory": 8, "general": [WEB, {"domain": "held"}],
                         "general_shares": [0.05, 0.25]}).replay
    assert [r.share_at(i) for i in (0, 1)] == [0, 0.25]
    assert [r.general_share_at(i) for i in (0, 1)] == [0.05, 0.25]
    assert _load(tmp_path, {"share": 0.1}).replay.share_at(1) == 0.1


# ----- the reservoir ------------------------------------------------------------------------------


def test_reservoir_sampling_keeps_a_uniform_sample_of_everything_seen():
    """Algorithm R over three stages of 4, 6 and 10 items into 5 slots: every item of the 20 stays
    with probability 5/20, whatever its stage (checked over 4000 seeded runs); never more than 5."""
    capacity, stages, trials = 5, [4, 6, 10], 4000
    kept = np.zeros(sum(stages))
    for t in range(trials):
        slots = np.full(capacity, -1)
        seen = 0
        for s, m in enumerate(stages):
            where, picks = res.reservoir_slots(seen, m, capacity, np.random.default_rng([t, s]))
            assert len(set(where.tolist())) == len(where) and (where < capacity).all()
            slots[where] = seen + picks
            seen += m
            assert (slots[: min(seen, capacity)] >= 0).all()
        kept[slots] += 1
    freq = kept / trials
    # binomial standard error at p = 0.25 over 4000 runs is 0.007: 0.035 is five of them
    assert np.abs(freq - capacity / sum(stages)).max() < 0.035
    # while the reservoir is not full, every item is kept in order
    where, picks = res.reservoir_slots(0, 3, 5, np.random.default_rng(0))
    assert where.tolist() == [0, 1, 2] and picks.tolist() == [0, 1, 2]


def test_reservoir_on_disk_holds_the_sampled_sequences_and_is_kept_whole(tmp_path):
    data = {d: np.random.default_rng(d).integers(0, 500, (30, 8)) for d in (0, 1)}

    def read_rows(items):
        return np.stack([data[d][i] for d, i in items])

    first = [(0, i) for i in range(0, 30, 3)]  # 10 sequences of stage 0
    m0 = res.absorb(tmp_path, None, 0, "code", first, read_rows, 6, 8, seed=3)
    assert len(m0) == 6 and m0.meta["seen"] == 10 and m0.tokens.dtype == np.int32
    second = [(1, i) for i in range(25)]
    m1 = res.absorb(tmp_path, m0, 1, "bible", second, read_rows, 6, 8, seed=3)
    assert len(m1) == 6 and m1.meta["seen"] == 35
    assert [s["name"] for s in m1.meta["stages"]] == ["code", "bible"]
    for m in (m0, m1):  # every slot holds the tokens of the sequence its provenance names
        for row, (stage, d, i) in zip(np.asarray(m.tokens), m.items):
            assert stage == d and (row == data[d][i]).all()
    assert not list(tmp_path.glob(".*"))  # no temp dir left behind
    # a small data set: the reservoir holds all of it, never more
    small = res.absorb(tmp_path / "small", None, 0, "code", first[:4], read_rows, 6, 8, seed=3)
    assert len(small) == 4 and np.asarray(small.tokens).shape == (4, 8)
    # the same stage absorbed again matches what is on disk; other data does not
    record = res.stage_record(1, "bible", second)
    assert res.matches(res.load(tmp_path, 1), m0, 6, 8, 3, record)
    assert not res.matches(res.load(tmp_path, 1), m0, 6, 8, 3, res.stage_record(1, "bible", first))
    assert not res.matches(res.load(tmp_path, 1), small, 6, 8, 3, record)  # other stages before
    assert not res.matches(res.load(tmp_path, 1), m0, 7, 8, 3, record)  # another memory
    assert res.remove_before(tmp_path, 1) == ["memory-s00"] and res.load(tmp_path, 0) is None


# ----- the mixes of every stage -------------------------------------------------------------------


class _Packed:
    def __init__(self, n: int, seed: int, seq_len: int = 32):
        self.train = TokenWindows.from_array(np.random.default_rng(seed).integers(0, 400, (n, seq_len)))


def _context(cfg, stage_index, domains, schedule=None):
    from cltk.method import StageContext
    from cltk.plan import plan_stages

    stages = plan_stages(cfg, {n: len(d.train) for n, d in domains.items()})
    stage = stages[stage_index]
    sdir = cfg.out / "stages" / stage.dirname
    prev = cfg.out / "stages" / stages[stage_index - 1].dirname if stage_index else None
    return StageContext(cfg, stage, stages, domains, None, sdir, prev, schedule=schedule)


def test_each_stage_gets_its_shares_and_the_reservoir_of_the_stages_before(tmp_path):
    from cltk.data.sampler import Pool, StageSchedule
    from cltk.errors import UserError
    from cltk.methods.replay.method import ReplayMethod

    cfg = _load(tmp_path, {"shares": [0, 0.25], "memory": 4, "general": [WEB, {"domain": "held"}],
                           "general_shares": [0.1, 0.2]})
    domains = {"code": _Packed(40, 0), "bible": _Packed(30, 1), "held": _Packed(20, 2),
               "replay.web": _Packed(25, 3)}
    method = ReplayMethod(cfg, cfg.replay)
    ctx0 = _context(cfg, 0, domains)
    assert ctx0.sources == ["code", "bible", "held", "replay.web"]
    (g0,) = method.mixes(ctx0)  # nothing earlier to replay in the first stage
    assert (g0.name, g0.share) == ("general data", 0.1)
    assert [(p.domain, len(p.indices)) for p in g0.pools] == [(3, 25), (2, 20)]
    # planned ahead (stage 0 not finished): a reservoir that will exist, with no rows to read yet
    earlier, general = method.mixes(_context(cfg, 1, domains))
    assert (earlier.share, general.share) == (0.25, 0.2)
    assert earlier.pools[0].domain == 4 and len(earlier.pools[0].indices) == 1
    # stage 0 ends: its trained sequences enter the reservoir, written to OUT/replay/memory-s00
    sched = StageSchedule(Pool(0, np.arange(40)), [g0], 10, 1.0, 2, cfg.seed, 0)
    ctx0.schedule = sched
    method.on_stage_end(ctx0)
    memory = res.load(cfg.out / "replay", 0)
    assert len(memory) == 4 and memory.meta["seen"] == 2 * 9  # 9 own sequences in each of 2 steps
    assert {(d, i) for _, d, i in memory.items} <= set(sched.trained_new())
    # the stage's end run again (a resume from its -end checkpoint) keeps the reservoir on disk
    stat = (memory.path / "tokens.npy").stat()
    method.on_stage_end(ctx0)
    again = (memory.path / "tokens.npy").stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    earlier, _ = method.mixes(_context(cfg, 1, domains))
    (pool,) = earlier.pools
    assert pool.domain == 4 and pool.indices.tolist() == [0, 1, 2, 3]
    for slot, (_, d, i) in enumerate(memory.items):  # the rows it brings are those sequences
        assert (pool.rows[slot]["input_ids"] == domains["code"].train[int(i)]["input_ids"]).all()
    # without memory: every earlier domain's data, under the domain's own id
    plain = ReplayMethod(cfg, type(cfg.replay)(shares=[0, 0.25]))
    (earlier,) = plain.mixes(_context(cfg, 1, domains))
    assert [(p.domain, len(p.indices), p.rows) for p in earlier.pools] == [(0, 40, None)]
    # a finished stage whose reservoir is gone: refused, not replayed from nothing
    (cfg.out / "stages" / "00-code").mkdir(parents=True)
    (cfg.out / "stages" / "00-code" / "stage.json").write_text("{}")
    res.remove_before(cfg.out / "replay", 1)
    fresh = ReplayMethod(cfg, cfg.replay)
    with pytest.raises(UserError, match="reservoir .*memory-s00 is missing"):
        fresh.mixes(_context(cfg, 1, domains))
    # once stage 1 is finished too, only its step count is asked for (by a later stage's LR
    # schedule): the reservoir it replayed may be gone
    (cfg.out / "stages" / "01-bible").mkdir(parents=True)
    (cfg.out / "stages" / "01-bible" / "stage.json").write_text("{}")
    earlier, _ = fresh.mixes(_context(cfg, 1, domains))
    assert len(earlier.pools[0].indices) == 1
    with pytest.raises(RuntimeError, match="not at hand"):
        earlier.pools[0].rows[0]


# ----- general sources are prepared like domains --------------------------------------------------


def test_general_sources_are_prepared_tokenised_recorded_and_checked(tmp_path):
    from cltk.data import prepare as prep
    from cltk.rundir import _clean_leftovers, config_differences

    jsonl = tmp_path / "web.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"web page {i} " + "words " * 60}) + "\n"
                             for i in range(60)))
    web = {"name": "web", "source": {"jsonl": str(jsonl)}}
    raw = {"domains": [BIBLE], "replay": {"general": [web], "general_share": 0.25},
           "data": {"eval_sequences": 2}}
    cfg = load_config(write_tiny_run(tmp_path, **raw), world_size=1)
    texts = list(prep._tokenizer_texts(cfg))
    assert any(t.startswith("web page") for t in texts)  # the tokenizer trains on it too
    tok, domains = prep.prepare(cfg)
    assert list(domains) == ["bible", "replay.web"] and len(domains["replay.web"].train) > 10
    assert len(list(cfg.cache_dir.glob("replay.web-*"))) == 1
    recorded = json.loads((cfg.out / "data.json").read_text())
    assert set(recorded) == {"bible", "replay.web"}
    # the trained tokenizer's inputs, and so its cache key, include the general source
    assert [d.name for d in prep._tokenizer_domains(cfg)] == ["bible", "replay.web"]
    # a run that trained on it is refused once the file changed
    (cfg.out / "checkpoints").mkdir()
    with open(jsonl, "a") as f:
        f.write(json.dumps({"text": "one more page " * 40}) + "\n")
    with pytest.raises(prep.StaleDataError, match=r"source 'replay.web'.*web.jsonl changed"):
        prep.prepare(cfg)
    # a resumed run whose general sources changed is refused by the config check
    saved = cfg.to_dict()
    now = {**saved, "replay": {**saved["replay"], "general": [{**web, "max_chars": 500,
                                                               "domain": None}]}}
    assert config_differences(saved, now) == ["replay.general[0].max_chars: None -> 500"]
    # an attempt that finished no stage leaves OUT/replay: removed with the other leftovers
    (cfg.out / "checkpoints").rmdir()
    (cfg.out / "world.json").write_text("{}")
    (cfg.out / "replay" / "memory-s00").mkdir(parents=True)
    assert "replay" in _clean_leftovers(cfg, cfg.out) and not (cfg.out / "replay").exists()


# ----- one short run: the per-step shares in the audit log, the reservoir on disk, a resume -------


def _cltk(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cltk", *args], env=full, capture_output=True,
                          text=True, timeout=600)


def test_a_run_mixes_general_data_and_a_reservoir_and_resumes_from_it(tmp_path):
    """Three stages of 4 steps of 4 sequences, 1 of them general data (a JSONL file) and, from the
    second stage on, 1 from a reservoir of 5; killed in the third stage and resumed."""
    jsonl = tmp_path / "web.jsonl"
    words = "the web page of a site with words on it and more words".split()
    rng = np.random.default_rng(0)
    jsonl.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 80))}) + "\n"
                             for _ in range(80)))
    verse = {"name": "verse", "source": {"builtin": "shakespeare"}, "max_chars": 20000}
    cfg_path = write_tiny_run(
        tmp_path,
        domains=[CODE, BIBLE, verse],
        train={"max_steps_per_stage": 4, "checkpoint_every": 2, "log_sequence_ids": True},
        eval={"start": False},
        replay={"share": 0.25, "memory": 5, "general_share": 0.25,
                "general": [{"name": "web", "source": {"jsonl": str(jsonl)}}]},
    )
    out = tmp_path / "out"
    killed = _cltk("train", "--config", str(cfg_path), env={"CLTK_KILL_AT": "2:2"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert res.load(out / "replay", 0) is None  # removed when stage 2 started: not needed any more
    second = res.load(out / "replay", 1)
    assert second is not None and len(second) == 5 and second.meta["seen"] == 4 * 3 + 4 * 2
    second_tokens, second_items = np.array(second.tokens), second.items.copy()
    resumed = _cltk("train", "--config", str(cfg_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    err = resumed.stderr
    assert "resumed from checkpoint s02-step000002 at step 2" in err
    # the resumed stage replays the reservoir stage 1 left on disk, which is not written again
    assert f"replays from {second.path} (5 sequences of stages code, bible)" in err
    assert "reservoir after stage 01-bible" not in err
    # every step of 4 sequences: 1 general (source id 3, after the domains 0, 1, 2), 1 from the
    # reservoir from stage 1 on (id 4, one of its 5 slots), the rest the stage's own
    lines = (out / "sequence_ids" / "rank0.jsonl").read_text().splitlines()
    steps = [(x["stage"], x["step"], x["ids"]) for x in map(json.loads, lines)]
    assert [(s, t) for s, t, _ in steps] == [(s, t) for s in range(3) for t in range(4)]
    for stage, _, ids in steps:
        sources = [d for d, _ in ids]
        assert sources.count(3) == 1 and sources.count(stage) == (3 if stage == 0 else 2)
        assert sources.count(4) == min(stage, 1) and all(i < 5 for d, i in ids if d == 4)
    own = [{tuple(x) for s, _, ids in steps if s == st for x in ids if x[0] == st} for st in range(3)]
    # the reservoirs hold the tokens of sequences those stages trained (read here from the cache)
    from cltk.data.prepare import prepare

    _, domains = prepare(load_config(cfg_path, world_size=1))
    last = res.load(out / "replay", 2)
    assert res.load(out / "replay", 1) is None  # only the last reservoir is kept after the run
    assert last.meta["seen"] == 20 + 4 * 2 and last.meta["stages"][:2] == second.meta["stages"]
    # algorithm R leaves a slot it did not replace as it was: stage 0 and 1's rows carried over
    carried = last.items[:, 0] < 2
    assert (last.items[carried] == second_items[carried]).all()
    assert (np.asarray(last.tokens)[carried] == second_tokens[carried]).all()
    for row, (stage, d, i) in zip(np.asarray(last.tokens), last.items):
        assert stage == d and (int(d), int(i)) in own[int(d)]
        name = ["code", "bible", "verse"][int(d)]
        assert (row == domains[name].train[int(i)]["input_ids"]).all()
    assert (out / "forgetting.json").is_file()
