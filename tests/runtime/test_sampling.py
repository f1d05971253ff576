from __future__ import annotations

import json

import numpy as np
import pytest

from moechat.runtime.errors import MoechatError
from moechat.runtime.sampling import Sampler, SamplingParams, _draw

VOCAB = 49152


def _logits(seed: int, vocab: int = VOCAB, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def _probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def _draws(params: SamplingParams, logits: np.ndarray, n: int, ctx=()) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.sample(logits, ctx) for _ in range(n)])


# --- SamplingParams ---------------------------------------------------------------------


def test_defaults_valid_and_greedy_flag() -> None:
    p = SamplingParams().validate()
    assert not p.greedy and p.stop == [] and p.seed is None
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams().stop is not SamplingParams().stop


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.1}, "repetition_penalty"),
        ({"repetition_penalty": 3}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**6}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": "1"}, "seed"),
        ({"stop": "x"}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
    ],
)
def test_validation_names_field_and_range(changes: dict, field: str) -> None:
    with pytest.raises(MoechatError) as info:
        SamplingParams().replace(**changes)
    msg = str(info.value)
    assert msg.startswith(field) and "\n" not in msg
    if field in SamplingParams.RANGES:
        assert SamplingParams.RANGES[field].describe() in msg


def test_range_bounds_inclusive_exclusive() -> None:
    ok = SamplingParams().replace(
        temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=32768, seed=0
    )
    assert ok.temperature == 2.0
    assert SamplingParams.RANGES["top_p"].describe() == "(0, 1]"
    assert SamplingParams.RANGES["min_p"].describe() == "[0, 1)"


def test_replace_does_not_mutate_and_rejects_unknown() -> None:
    base = SamplingParams()
    new = base.replace(top_k=40, stop=("a", "b"))
    assert base.top_k == 0 and new.top_k == 40 and new.stop == ["a", "b"]
    with pytest.raises(MoechatError, match="unknown sampling setting 'topk'; valid: temperature"):
        base.replace(topk=3)


@pytest.mark.parametrize(
    "name, value, field, expected",
    [
        ("temperature", "0.2", "temperature", 0.2),
        ("temp", " 1 ", "temperature", 1.0),
        ("top-k", "40", "top_k", 40),
        ("TOP_P", "0.9", "top_p", 0.9),
        ("min_p", "0.05", "min_p", 0.05),
        ("repetition_penalty", "1.1", "repetition_penalty", 1.1),
        ("max_tokens", "100", "max_new_tokens", 100),
        ("seed", "42", "seed", 42),
        ("seed", "none", "seed", None),
        ("seed", "random", "seed", None),
        ("stop", "none", "stop", []),
        ("stop", "\\n\\nUser:", "stop", ["\n\nUser:"]),
        ("stop", '["</s>", "停"]', "stop", ["</s>", "停"]),
        ("stop", "a, b", "stop", ["a, b"]),
    ],
)
def test_set_from_text(name: str, value: str, field: str, expected: object) -> None:
    p = SamplingParams().set_from_text(name, value)
    assert getattr(p, field) == expected


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("temperatur", "1", "unknown sampling setting 'temperatur'; valid: temperature, top_k"),
        ("temperature", "hot", "temperature must be a number, got 'hot'"),
        ("top_k", "4.5", "top_k must be an integer"),
        ("temperature", "9", r"temperature must be a number in \[0, 2\]"),
        ("temperature", "inf", "temperature must be a number"),
        ("stop", "[1, 2]", "stop must be a list of non-empty strings"),
        ("stop", "[oops", "stop: cannot parse JSON list"),
    ],
)
def test_set_from_text_errors(name: str, value: str, match: str) -> None:
    with pytest.raises(MoechatError, match=match) as info:
        SamplingParams().set_from_text(name, value)
    assert "\n" not in str(info.value)


def test_dict_roundtrip() -> None:
    p = SamplingParams(temperature=0.3, top_k=5, seed=7, stop=["\n\n"])
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert SamplingParams.from_dict(d) == p
    d["stop"].append("x")
    assert p.stop == ["\n\n"]
    assert SamplingParams.from_dict({"top_p": 0.5, "future_key": 1}) == SamplingParams(top_p=0.5)
    with pytest.raises(MoechatError, match="top_p"):
        SamplingParams.from_dict({"top_p": 5})


# --- Sampler ------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    for seed in range(5):
        logits = _logits(seed)
        assert Sampler(SamplingParams(temperature=0)).sample(logits, []) == int(np.argmax(logits))


def test_same_seed_same_draws_and_none_is_random() -> None:
    logits = _logits(0, scale=1.0)
    p = SamplingParams(temperature=1.0, seed=123)
    a, b = _draws(p, logits, 50), _draws(p, logits, 50)
    assert (a == b).all()
    assert not (a == _draws(p.replace(seed=124), logits, 50)).all()
    unseeded = SamplingParams(temperature=1.0)
    assert not (_draws(unseeded, logits, 50) == _draws(unseeded, logits, 50)).all()


@pytest.mark.parametrize("seed", range(4))
def test_top_k_never_leaves_top_k(seed: int) -> None:
    logits = _logits(seed, scale=0.5)  # flat: all tokens are plausible without top-k
    k = 7
    allowed = set(np.argsort(-logits)[:k].tolist())
    draws = _draws(SamplingParams(temperature=2.0, top_k=k, seed=seed), logits, 600)
    assert set(draws.tolist()) <= allowed
    assert len(set(draws.tolist())) == k


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9])
def test_top_p_never_leaves_nucleus(seed: int, top_p: float) -> None:
    logits = _logits(seed, vocab=2000, scale=2.0)
    probs = _probs(logits, 0.8)
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    allowed = set(order[:n].tolist())
    draws = _draws(SamplingParams(temperature=0.8, top_p=top_p, seed=seed), logits, 1500)
    assert set(draws.tolist()) <= allowed
    assert order[0] in set(draws.tolist())


def test_top_p_with_large_vocab_uses_pool_correctly() -> None:
    logits = _logits(3, scale=6.0)  # peaked: the nucleus fits the candidate pool
    probs = _probs(logits, 1.0)
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), 0.8)) + 1
    draws = _draws(SamplingParams(temperature=1.0, top_p=0.8, seed=1), logits, 1000)
    assert set(draws.tolist()) <= set(order[:n].tolist())
    flat = _logits(4, scale=0.1)  # flat: the pools are too small, full sort path
    probs = _probs(flat, 1.0)
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1
    draws = _draws(SamplingParams(temperature=1.0, top_p=0.5, seed=1), flat, 200)
    assert set(draws.tolist()) <= set(order[:n].tolist())


def test_tiny_top_p_keeps_at_least_one() -> None:
    logits = _logits(5)
    draws = _draws(SamplingParams(temperature=1.0, top_p=1e-9, seed=0), logits, 50)
    assert set(draws.tolist()) == {int(np.argmax(logits))}


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_never_below_threshold(min_p: float) -> None:
    logits = _logits(6, vocab=3000, scale=2.0)
    probs = _probs(logits, 1.0)
    allowed = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    draws = _draws(SamplingParams(temperature=1.0, min_p=min_p, seed=2), logits, 1500)
    assert set(draws.tolist()) <= allowed


def test_combined_filters() -> None:
    logits = _logits(7, scale=1.5)
    p = SamplingParams(temperature=0.9, top_k=30, top_p=0.6, min_p=0.2, seed=3)
    probs = _probs(logits, 0.9)
    top = np.argsort(-probs)[:30]
    sub = probs[top] / probs[top].sum()
    n = int(np.searchsorted(np.cumsum(sub), 0.6)) + 1
    nucleus = top[:n]
    allowed = {int(i) for i in nucleus if probs[i] >= 0.2 * probs[top[0]]}
    assert set(_draws(p, logits, 1500).tolist()) <= allowed


def test_distribution_matches_softmax() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = _draws(SamplingParams(temperature=1.0, seed=9), logits, 20000)
    freq = np.bincount(draws, minlength=4) / draws.size
    assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # temperature sharpens
    sharp = _draws(SamplingParams(temperature=0.3, seed=9), logits, 5000)
    assert (sharp == 0).mean() > 0.8


def test_draw_two_level_matches_probabilities() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random(3000)
    probs[::5] = 1e-300
    probs /= probs.sum()
    counts = np.bincount([_draw(probs, rng.random()) for _ in range(60000)], minlength=3000)
    assert counts[::5].sum() == 0
    assert np.abs(counts / 60000 - probs).max() < 0.002
    assert _draw(np.array([0.0, 1.0, 0.0]), 0.999999) == 1


def test_repetition_penalty() -> None:
    logits = np.array([2.0, 1.9, -1.0, -1.05, 0.0], dtype=np.float32)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert Sampler(greedy).sample(logits, []) == 0
    assert Sampler(greedy).sample(logits, [0, 0, 0]) == 1  # 2.0 / 1.2 < 1.9
    only_neg = np.array([-1.0, -1.05], dtype=np.float32)
    assert Sampler(greedy).sample(only_neg, [0]) == 1  # -1.0 * 1.2 < -1.05
    assert Sampler(greedy).sample(logits, [99, -5]) == 0  # out-of-range ids ignored
    # sampling: penalised token gets rarer
    flat = np.zeros(10, dtype=np.float32) + 1.0
    p = SamplingParams(temperature=1.0, repetition_penalty=2.0, seed=0)
    draws = _draws(p, flat, 5000, ctx=[3])
    assert (draws == 3).mean() < 0.07
    # logits passed in are not modified
    before = logits.copy()
    Sampler(greedy).sample(logits, [0, 1, 2])
    assert (logits == before).all()


def test_masked_and_bad_logits() -> None:
    logits = np.full(100, -np.inf, dtype=np.float32)
    logits[[7, 42]] = 0.0
    assert set(_draws(SamplingParams(temperature=1.0, seed=0), logits, 200).tolist()) == {7, 42}
    nan = logits.copy()
    nan[3] = np.nan
    assert set(_draws(SamplingParams(temperature=1.0, seed=0), nan, 200).tolist()) == {7, 42}
    assert Sampler(SamplingParams(temperature=0)).sample(nan, []) in (7, 42)
    for params in (SamplingParams(), SamplingParams(temperature=0)):
        with pytest.raises(ValueError):
            Sampler(params).sample(np.full(5, -np.inf), [])
    with pytest.raises(ValueError):
        Sampler(SamplingParams()).sample(np.zeros((2, 3)), [])


def test_speed_full_vocab() -> None:
    import time

    logits = _logits(8, scale=10.0)
    ctx = list(range(0, 3000, 3))
    for params in [
        SamplingParams(seed=0),
        SamplingParams(top_k=40, seed=0),
        SamplingParams(top_p=0.9, repetition_penalty=1.1, seed=0),
    ]:
        sampler = Sampler(params)
        t0 = time.perf_counter()
        for _ in range(100):
            sampler.sample(logits, ctx)
        assert (time.perf_counter() - t0) / 100 < 0.02  # generous: ~0.1-1 ms typical
