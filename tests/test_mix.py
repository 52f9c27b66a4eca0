"""N-1 conference mixer: ext/mix.pyx ("c") and its numpy twin ext/mix_py.py ("py").

Every behavioural test runs against both; the property tests check that the
two agree bit for bit on random frames, laws and flags.
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ext import g711_py as g711
from ext import mix_py as py_mix

FRAME = 160


def _c_module():
    if os.environ.get("BATON_NO_EXTENSIONS"):
        return None
    try:
        return importlib.import_module("ext.mix")
    except ImportError:
        return None


C_MIX = _c_module()
needs_c = pytest.mark.skipif(C_MIX is None, reason="ext.mix not built or BATON_NO_EXTENSIONS set")


@pytest.fixture(params=[pytest.param("c", marks=needs_c), "py"], ids=["c", "py"])
def mixmod(request):
    return C_MIX if request.param == "c" else py_mix


# --------------------------------------------------------------------------- helpers


def pcm_bytes(samples) -> bytes:
    return np.asarray(samples, dtype=np.int16).astype("<i2").tobytes()


def pcm_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.int32)


def tone(amplitude: int, period: int = 20, phase: int = 0) -> np.ndarray:
    t = np.arange(FRAME) + phase
    return np.round(amplitude * np.sin(2 * np.pi * t / period)).astype(np.int16)


def clip16(x) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.int64), -32768, 32767).astype(np.int16)


# Straightforward scalar G.711 expanders (the classic formulas, not the
# table-driven reference), used to check the laws independently.
def ulaw_expand(code: int) -> int:
    u = ~code & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = ((mantissa << 3) + 0x84 << exponent) - 0x84
    return -magnitude if sign else magnitude


def alaw_expand(code: int) -> int:
    a = code ^ 0x55
    sign, exponent, mantissa = a & 0x80, (a >> 4) & 0x07, a & 0x0F
    if exponent == 0:
        magnitude = (mantissa << 4) + 8
    else:
        magnitude = ((mantissa << 4) + 0x108) << (exponent - 1)
    return magnitude if sign else -magnitude


def expand(data: bytes, law: str) -> np.ndarray:
    f = ulaw_expand if law == "ulaw" else alaw_expand
    return np.array([f(b) for b in data], dtype=np.int32)


ENCODE = {"ulaw": g711.ulaw_encode, "alaw": g711.alaw_encode}


# --------------------------------------------------------------------------- who hears what


def test_two_parties_hear_each_other(mixmod):
    conf = mixmod.Conference()
    conf.add("a")
    conf.add("b")
    a, b = tone(1000), tone(2000, period=16)
    conf.put("a", pcm_bytes(a))
    conf.put("b", b)   # an int16 array works as well as bytes
    out = conf.mix()
    assert set(out) == {"a", "b"}
    assert out["a"] == pcm_bytes(b)
    assert out["b"] == pcm_bytes(a)


def test_three_parties_hear_the_other_two(mixmod):
    conf = mixmod.Conference()
    frames = {1: tone(3000), 2: tone(-2500, period=32), 3: tone(1200, period=10, phase=3)}
    for pid, f in frames.items():
        conf.add(pid)
        conf.put(pid, pcm_bytes(f))
    out = conf.mix()
    for pid in frames:
        others = sum(frames[o].astype(np.int32) for o in frames if o != pid)
        assert out[pid] == pcm_bytes(others), pid


@pytest.mark.parametrize("law", ["pcm", "ulaw", "alaw"])
def test_lone_participant_hears_silence(mixmod, law):
    conf = mixmod.Conference()
    conf.add(7, law)
    conf.put(7, pcm_bytes(tone(8000)) if law == "pcm" else ENCODE[law](tone(8000)))
    silence = np.zeros(FRAME, dtype=np.int16)
    expected = pcm_bytes(silence) if law == "pcm" else ENCODE[law](silence)
    assert conf.mix() == {7: expected}


def test_saturates_instead_of_wrapping(mixmod):
    conf = mixmod.Conference()
    for pid in "abc":
        conf.add(pid)
    conf.put("a", pcm_bytes(np.full(FRAME, 30000)))
    conf.put("b", pcm_bytes(np.full(FRAME, 30000)))
    conf.put("c", pcm_bytes(np.full(FRAME, 20000)))
    out = conf.mix()
    # 60000 and 50000 would wrap to negative values in int16.
    assert set(pcm_of(out["a"])) == {32767}
    assert set(pcm_of(out["b"])) == {32767}
    assert set(pcm_of(out["c"])) == {32767}

    for pid in "abc":
        conf.put(pid, pcm_bytes(np.full(FRAME, -32768)))
    out = conf.mix()
    assert all(set(pcm_of(out[p])) == {-32768} for p in "abc")


def test_saturation_at_both_rails_in_one_frame(mixmod):
    conf = mixmod.Conference()
    conf.add("x")
    conf.add("y")
    conf.add("z")
    big = np.where(np.arange(FRAME) % 2, 32767, -32768).astype(np.int16)
    conf.put("x", pcm_bytes(big))
    conf.put("y", pcm_bytes(big))
    out = conf.mix()
    assert np.array_equal(pcm_of(out["z"]), big)   # 2*big clipped is big again
    assert np.array_equal(pcm_of(out["x"]), big)


def test_saturation_with_many_full_scale_talkers(mixmod):
    conf = mixmod.Conference(max_participants=200)
    for pid in range(200):
        conf.add(pid, "ulaw" if pid % 2 else "pcm")
        conf.put(pid, ENCODE["ulaw"](np.full(FRAME, 32767, dtype=np.int16)) if pid % 2
                 else pcm_bytes(np.full(FRAME, 32767)))
    out = conf.mix()
    assert set(pcm_of(out[0])) == {32767}
    assert out[1] == ENCODE["ulaw"](np.full(FRAME, 32767, dtype=np.int16))


def test_muted_and_listen_only_are_excluded_but_hear(mixmod):
    conf = mixmod.Conference()
    conf.add("talker1")
    conf.add("muted", muted=True)
    conf.add("listener", listen_only=True)
    conf.add("talker2")
    frames = {"talker1": tone(1000), "muted": tone(9000), "listener": tone(7000),
              "talker2": tone(500, period=8)}
    for pid, f in frames.items():
        conf.put(pid, pcm_bytes(f))
    out = conf.mix()
    both = frames["talker1"].astype(np.int32) + frames["talker2"]
    assert out["talker1"] == pcm_bytes(frames["talker2"])
    assert out["talker2"] == pcm_bytes(frames["talker1"])
    assert out["muted"] == pcm_bytes(both)
    assert out["listener"] == pcm_bytes(both)


def test_flags_are_distinct_and_switch_between_ticks(mixmod):
    conf = mixmod.Conference()
    conf.add("a", muted=True)
    conf.add("b", listen_only=True)
    conf.add("c")
    assert conf.is_muted("a") and not conf.is_listen_only("a")
    assert conf.is_listen_only("b") and not conf.is_muted("b")
    a, b = tone(1000), tone(2000, period=40)

    conf.put("a", pcm_bytes(a))
    conf.put("b", pcm_bytes(b))
    assert conf.mix()["c"] == pcm_bytes(np.zeros(FRAME))

    conf.set_muted("a", False)
    conf.put("a", pcm_bytes(a))
    conf.put("b", pcm_bytes(b))
    assert conf.mix()["c"] == pcm_bytes(a)

    # Unmuting does not lift listen-only: the two flags are independent.
    conf.set_muted("b", True)
    conf.set_listen_only("b", False)
    assert conf.is_muted("b") and not conf.is_listen_only("b")
    conf.put("a", pcm_bytes(a))
    conf.put("b", pcm_bytes(b))
    assert conf.mix()["c"] == pcm_bytes(a)
    conf.set_muted("b", False)
    conf.put("a", pcm_bytes(a))
    conf.put("b", pcm_bytes(b))
    out = conf.mix()
    assert out["c"] == pcm_bytes(a.astype(np.int32) + b)
    assert out["a"] == pcm_bytes(b)


def test_expanders_agree_with_reference_decoder():
    codes = bytes(range(256))
    assert np.array_equal(expand(codes, "ulaw"), pcm_of(g711.ulaw_decode(codes)))
    assert np.array_equal(expand(codes, "alaw"), pcm_of(g711.alaw_decode(codes)))


def test_mixed_laws(mixmod):
    conf = mixmod.Conference()
    conf.add("u", "ulaw")
    conf.add("a", "alaw")
    conf.add("p", "pcm")
    assert [conf.law(x) for x in "uap"] == ["ulaw", "alaw", "pcm"]
    src_u, src_a, src_p = tone(6000), tone(-4000, period=25), tone(3000, period=9, phase=2)
    in_u, in_a = g711.ulaw_encode(src_u), g711.alaw_encode(src_a)
    conf.put("u", in_u)
    conf.put("a", in_a)
    conf.put("p", pcm_bytes(src_p))
    out = conf.mix()
    assert len(out["u"]) == FRAME and len(out["a"]) == FRAME and len(out["p"]) == 2 * FRAME

    dec_u, dec_a = expand(in_u, "ulaw"), expand(in_a, "alaw")
    heard_u = clip16(dec_a + src_p)
    heard_a = clip16(dec_u + src_p)
    heard_p = clip16(dec_u + dec_a)
    assert out["p"] == pcm_bytes(heard_p)
    assert out["u"] == g711.ulaw_encode(heard_u)
    assert out["a"] == g711.alaw_encode(heard_a)
    # And what comes back decodes to the mix within G.711 quantisation.
    assert np.max(np.abs(expand(out["u"], "ulaw") - heard_u)) <= 256
    assert np.max(np.abs(expand(out["a"], "alaw") - heard_a)) <= 256


def test_listeners_of_each_law_share_the_sum(mixmod):
    conf = mixmod.Conference()
    conf.add("talker", "ulaw")
    for law in ("pcm", "ulaw", "alaw"):
        conf.add(law + "-listener", law, listen_only=True)
    src = g711.ulaw_encode(tone(10000))
    conf.put("talker", src)
    out = conf.mix()
    dec = expand(src, "ulaw")
    assert out["pcm-listener"] == pcm_bytes(dec)
    assert out["ulaw-listener"] == g711.ulaw_encode(clip16(dec))
    assert out["alaw-listener"] == g711.alaw_encode(clip16(dec))
    assert out["talker"] == g711.ulaw_encode(np.zeros(FRAME, dtype=np.int16))


def test_participant_without_input_contributes_silence(mixmod):
    conf = mixmod.Conference()
    for pid in "abc":
        conf.add(pid)
    a, c = tone(1000), tone(1500, period=12)
    conf.put("a", pcm_bytes(a))
    conf.put("c", pcm_bytes(c))
    out = conf.mix()
    assert out["a"] == pcm_bytes(c)
    assert out["c"] == pcm_bytes(a)
    assert out["b"] == pcm_bytes(a.astype(np.int32) + c)


def test_mix_clears_the_inputs(mixmod):
    conf = mixmod.Conference()
    conf.add("a", "alaw")
    conf.add("b")
    conf.put("a", g711.alaw_encode(tone(5000)))
    conf.put("b", pcm_bytes(tone(5000)))
    conf.mix()
    out = conf.mix()
    assert out["a"] == g711.alaw_encode(np.zeros(FRAME, dtype=np.int16))
    assert out["b"] == pcm_bytes(np.zeros(FRAME))


def test_second_put_in_a_tick_replaces_the_first(mixmod):
    conf = mixmod.Conference()
    conf.add("a")
    conf.add("b")
    conf.put("a", pcm_bytes(tone(9000)))
    conf.put("a", pcm_bytes(tone(100)))
    assert conf.mix()["b"] == pcm_bytes(tone(100))


def test_put_copies_the_callers_buffer(mixmod):
    conf = mixmod.Conference()
    conf.add("a")
    conf.add("b")
    buf = tone(1234)
    conf.put("a", buf)
    buf[:] = 0
    assert conf.mix()["b"] == pcm_bytes(tone(1234))


def test_add_and_remove_between_ticks(mixmod):
    conf = mixmod.Conference()
    conf.add("a")
    conf.add("b")
    conf.add("c", "ulaw")
    assert conf.participants() == ["a", "b", "c"]
    conf.put("a", pcm_bytes(tone(1000)))
    conf.put("b", pcm_bytes(tone(2000)))
    conf.mix()

    conf.remove("a")
    assert conf.participants() == ["b", "c"] and "a" not in conf and len(conf) == 2
    conf.add("d", "alaw")
    assert conf.participants() == ["b", "c", "d"]
    conf.put("b", pcm_bytes(tone(2000)))
    conf.put("d", g711.alaw_encode(tone(700)))
    out = conf.mix()
    assert set(out) == {"b", "c", "d"}
    dec_d = expand(g711.alaw_encode(tone(700)), "alaw")
    assert out["b"] == pcm_bytes(dec_d)
    assert out["d"] == g711.alaw_encode(tone(2000))
    assert out["c"] == g711.ulaw_encode(clip16(dec_d + tone(2000)))

    # A participant removed with input pending leaves no trace in the next mix.
    conf.put("b", pcm_bytes(tone(2000)))
    conf.remove("b")
    conf.add("b")
    assert conf.mix() == {p: (pcm_bytes(np.zeros(FRAME)) if p == "b"
                              else ENCODE[conf.law(p)](np.zeros(FRAME, dtype=np.int16)))
                          for p in ("c", "d", "b")}
    assert conf.participants() == ["c", "d", "b"]


def test_slots_are_the_lowest_free(mixmod):
    conf = mixmod.Conference(max_participants=4)
    assert [conf.add(p) for p in "abc"] == [0, 1, 2]
    conf.remove("b")
    assert conf.add("d") == 1
    assert conf.slot("d") == 1 and conf.slot("c") == 2


def test_unknown_participant(mixmod):
    conf = mixmod.Conference()
    conf.add("a")
    for call in (lambda: conf.remove("zz"), lambda: conf.put("zz", b"\0" * 320),
                 lambda: conf.set_muted("zz", True), lambda: conf.set_listen_only("zz", True)):
        with pytest.raises(KeyError, match="zz"):
            call()
    with pytest.raises(ValueError, match="already in the conference"):
        conf.add("a")


def test_max_participants_enforced(mixmod):
    conf = mixmod.Conference(max_participants=3)
    for pid in range(3):
        conf.add(pid)
    with pytest.raises(ValueError, match="max_participants=3"):
        conf.add(3)
    assert conf.participants() == [0, 1, 2]
    conf.remove(1)
    conf.add(3)
    assert conf.participants() == [0, 2, 3]


@pytest.mark.parametrize("kwargs", [{"max_participants": 0}, {"max_participants": 70000},
                                    {"frame": 0}])
def test_bad_conference_size(mixmod, kwargs):
    with pytest.raises(ValueError, match="max_participants|frame"):
        mixmod.Conference(**kwargs)


def test_other_frame_sizes(mixmod):
    conf = mixmod.Conference(frame=80)
    conf.add("a", "ulaw")
    conf.add("b")
    conf.put("a", g711.ulaw_encode(np.full(80, 1000, dtype=np.int16)))
    conf.put("b", pcm_bytes(np.full(80, -1000)))
    out = conf.mix()
    assert out["a"] == g711.ulaw_encode(np.full(80, -1000, dtype=np.int16))
    assert out["b"] == pcm_bytes(expand(g711.ulaw_encode(np.full(80, 1000, dtype=np.int16)),
                                        "ulaw"))


def test_bad_input(mixmod):
    conf = mixmod.Conference()
    conf.add("u", "ulaw")
    conf.add("p")
    with pytest.raises(ValueError, match=r"'u': a ulaw frame is 160 bytes, got 159"):
        conf.put("u", b"\xff" * 159)
    with pytest.raises(ValueError, match=r"a ulaw frame is 160 bytes, got 320"):
        conf.put("u", np.zeros(FRAME, dtype=np.int16))
    with pytest.raises(ValueError, match=r"'p': a pcm frame is 320 bytes \(160 samples\), got 160"):
        conf.put("p", b"\0" * 160)
    with pytest.raises(ValueError, match=r"a pcm frame is 160 samples, got 161"):
        conf.put("p", np.zeros(161, dtype=np.int16))
    with pytest.raises(TypeError, match="int16"):
        conf.put("p", np.zeros(FRAME, dtype=np.float32))
    with pytest.raises(ValueError, match="unknown law 'gsm'"):
        conf.add("g", "gsm")
    # Rejected frames leave no input behind.
    assert conf.mix() == {"u": g711.ulaw_encode(np.zeros(FRAME, dtype=np.int16)),
                          "p": pcm_bytes(np.zeros(FRAME))}


def test_accepts_bytearray_and_memoryview(mixmod):
    conf = mixmod.Conference()
    conf.add("u", "ulaw")
    conf.add("p")
    conf.put("u", bytearray(g711.ulaw_encode(tone(3000))))
    conf.put("p", memoryview(pcm_bytes(tone(100))))
    out = conf.mix()
    assert out["u"] == g711.ulaw_encode(tone(100))
    assert out["p"] == pcm_bytes(expand(g711.ulaw_encode(tone(3000)), "ulaw"))


# --------------------------------------------------------------------------- mix_minus


def brute_force_mix_minus(frames: np.ndarray, active: np.ndarray) -> np.ndarray:
    n = frames.shape[0]
    out = np.empty_like(frames)
    for i in range(n):
        others = [frames[j].astype(np.int64) for j in range(n) if j != i and active[j]]
        out[i] = clip16(sum(others) if others else np.zeros(frames.shape[1]))
    return out


def test_mix_minus(mixmod):
    rng = np.random.default_rng(5)
    frames = rng.integers(-32768, 32768, size=(6, FRAME), dtype=np.int16)
    active = np.array([1, 1, 0, 1, 0, 1], dtype=bool)
    out = mixmod.mix_minus(frames, active)
    assert out.dtype == np.int16 and out.shape == frames.shape
    assert np.array_equal(out, brute_force_mix_minus(frames, active))


def test_mix_minus_saturates(mixmod):
    frames = np.array([[30000] * 4, [30000] * 4, [-30000] * 4, [-30000] * 4], dtype=np.int16)
    out = mixmod.mix_minus(frames, [True, True, False, False])
    assert out.tolist() == [[30000] * 4, [30000] * 4, [32767] * 4, [32767] * 4]
    out = mixmod.mix_minus(frames, [False, False, True, True])
    assert out.tolist() == [[-32768] * 4, [-32768] * 4, [-30000] * 4, [-30000] * 4]


def test_mix_minus_bad_input(mixmod):
    with pytest.raises(TypeError, match="int16"):
        mixmod.mix_minus(np.zeros((2, FRAME), dtype=np.int32), [True, True])
    with pytest.raises(ValueError, match="2-dimensional"):
        mixmod.mix_minus(np.zeros(FRAME, dtype=np.int16), [True])
    with pytest.raises(ValueError, match=r"active must have shape \(2,\)"):
        mixmod.mix_minus(np.zeros((2, FRAME), dtype=np.int16), [True, True, False])
    assert mixmod.mix_minus(np.zeros((0, FRAME), dtype=np.int16), []).shape == (0, FRAME)


# --------------------------------------------------------------------------- c == py


participant = st.fixed_dictionaries({
    "law": st.sampled_from(["pcm", "ulaw", "alaw"]),
    "muted": st.booleans(),
    "listen_only": st.booleans(),
    "puts": st.booleans(),
    "pcm": hnp.arrays(np.int16, FRAME, elements=st.integers(-32768, 32767)),
    "coded": st.binary(min_size=FRAME, max_size=FRAME),
})


def _run(mod, parts, ticks):
    conf = mod.Conference(max_participants=len(parts))
    outputs = []
    for i, p in enumerate(parts):
        conf.add(i, p["law"], muted=p["muted"], listen_only=p["listen_only"])
    for tick in range(ticks):
        for i, p in enumerate(parts):
            if p["puts"] or tick:   # second tick: everyone talks
                conf.put(i, pcm_bytes(p["pcm"]) if p["law"] == "pcm" else p["coded"])
        if tick:
            conf.set_muted(0, not parts[0]["muted"])
        outputs.append(conf.mix())
    return outputs


@needs_c
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(participant, min_size=1, max_size=8))
def test_c_and_py_conferences_agree(parts):
    assert _run(C_MIX, parts, 2) == _run(py_mix, parts, 2)


@needs_c
@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(0, 12), f=st.integers(1, 200))
def test_c_and_py_mix_minus_agree(data, n, f):
    frames = data.draw(hnp.arrays(np.int16, (n, f)))
    active = data.draw(hnp.arrays(np.bool_, n))
    out = C_MIX.mix_minus(frames, active)
    assert np.array_equal(out, py_mix.mix_minus(frames, active))
    if n <= 6:
        assert np.array_equal(out, brute_force_mix_minus(frames, active))


def test_selection():
    from ext.kernels import mix as mixer

    expected = "c" if C_MIX is not None else "py"
    assert mixer.IMPLEMENTATION == expected
    assert mixer.Conference is (C_MIX or py_mix).Conference
