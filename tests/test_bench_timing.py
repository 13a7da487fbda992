"""The benchmark's interleaved timing: ratios from adjacent measurements of one round."""

from __future__ import annotations

import torch

from lorakern.bench import timing


def test_round_ratio_follows_the_rounds_not_the_overall_medians(monkeypatch):
    """A slow spell that hits a provider and its reference in the same round leaves their ratio
    alone: the per-round ratio is the median of a / b, where the ratio of medians mixes spells."""
    # Rounds of (a, b): the machine 2x slower in rounds 2 and 3; a is 1.1x b in every round.
    b_times = [1.0, 1.0, 2.0, 2.0, 1.0]
    a_times = [1.1 * t for t in b_times]
    queue = [t for pair in zip(a_times, b_times) for t in pair]
    monkeypatch.setattr(timing, "measure", lambda step, device, min_run_time: (queue.pop(0),) * 3)
    rounds: dict = {}
    timed = timing.interleaved({"a": None, "b": None}, torch.device("cpu"), 0.1, rounds)
    assert not queue and rounds == {"a": a_times, "b": b_times}
    assert timed["a"][0] == 1.1 and timed["b"][0] == 1.0
    assert abs(timing.round_ratio(rounds, "a", "b") - 1.1) < 1e-12
    assert timing.round_ratio(rounds, "b", "b") == 1.0
    assert timing.round_ratio(rounds, "a", "missing") is None

    # A spell on one side only, in two rounds of five (a slow in round 0, b in round 4), does not
    # move the median of the per-round ratios.
    a2 = [3.3, 1.1, 1.1, 1.1, 1.1]
    b2 = [1.0, 1.0, 1.0, 1.0, 5.0]
    assert abs(timing.round_ratio({"a": a2, "b": b2}, "a", "b") - 1.1) < 1e-12


def test_rounds_option_sets_the_rounds_and_keeps_the_time_per_round(monkeypatch, tmp_path):
    """--rounds N times every comparison in N rounds of the default round's length."""
    from lorakern.bench import cli

    seen = []
    monkeypatch.setattr(timing, "measure", lambda step, device, min_run_time: seen.append(min_run_time) or (1.0,) * 3)
    try:
        for rounds in (3, 9):
            seen.clear()
            argv = ["--device", "cpu", "--suite", "lora", "--providers", "fused,unfused", "--modes", "eval",
                    "--shapes", "3,8,8,2", "--rounds", str(rounds), "--out", str(tmp_path), "--no-progress"]
            assert cli.main(argv) == 0
            assert len(seen) == 2 * rounds and all(abs(t - 0.2 / timing.DEFAULT_ROUNDS) < 1e-12 for t in seen)
    finally:
        timing.ROUNDS = timing.DEFAULT_ROUNDS
