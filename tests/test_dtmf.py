"""In-band DTMF detection (ITU-T Q.23 / Q.24), both implementations.

Every signal is generated here with numpy. Levels are per tone in dBm0 with
the G.711 convention that a full-scale sine is +3.14 dBm0 (0 dBm0 is a peak
of 32768 x 10^(-3.14/20) = 22826 in 16-bit PCM). The battery follows the
usual Q.24 / Bellcore-style acceptance tests: frequency tolerance, twist,
duration, interdigit pause, dynamic range, white noise, and talk-off on
synthesised speech.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from ext import dtmf_py as dtmf_py
from ext import g711_py as g711

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FS = 8000
ROWS = (697, 770, 852, 941)
COLS = (1209, 1336, 1477, 1633)
KEYS = "123A456B789C*0#D"
ALL_DIGITS = "1234567890*#ABCD"
DBM0 = 32768.0 * 10 ** (-3.14 / 20)
ONSET_TOLERANCE = 40            # samples (5 ms)


def _c_module():
    if os.environ.get("BATON_NO_EXTENSIONS"):
        pytest.skip("BATON_NO_EXTENSIONS=1: the reference twin only")
    return pytest.importorskip("ext.dtmf", reason="ext.dtmf not built")


@pytest.fixture(params=["c", "py"])
def Detector(request):
    return _c_module().DtmfDetector if request.param == "c" else dtmf_py.DtmfDetector


# --- Signal generation ----------------------------------------------------

def freqs_of(digit: str) -> tuple[int, int]:
    i = KEYS.index(digit)
    return ROWS[i // 4], COLS[i % 4]


def tone(digit, ms, row_dbm0=-10.0, col_dbm0=None, dev=(0.0, 0.0), rng=None, rate=FS):
    """A DTMF burst as float samples, random phases. `dev` is the relative frequency error."""
    rng = rng if rng is not None else np.random.default_rng(0)
    fr, fc = freqs_of(digit)
    col_dbm0 = row_dbm0 if col_dbm0 is None else col_dbm0
    t = np.arange(int(round(ms * rate / 1000))) / rate
    ph = rng.uniform(0, 2 * np.pi, 2)
    return (DBM0 * 10 ** (row_dbm0 / 20) * np.sin(2 * np.pi * fr * (1 + dev[0]) * t + ph[0])
            + DBM0 * 10 ** (col_dbm0 / 20) * np.sin(2 * np.pi * fc * (1 + dev[1]) * t + ph[1]))


def silence(ms, rate=FS):
    return np.zeros(int(round(ms * rate / 1000)))


def pcm(x) -> np.ndarray:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def burst(digit, ms=50.0, lead_ms=20.0, tail_ms=60.0, **kw):
    """Silence, one tone, silence; returns (pcm, onset sample)."""
    lead = silence(lead_ms)
    return pcm(np.concatenate([lead, tone(digit, ms, **kw), silence(tail_ms)])), len(lead)


def digits(Detector, x, rate=FS) -> str:
    return "".join(d for d, _ in Detector(rate).feed(x))


# --- The battery -----------------------------------------------------------

def test_all_sixteen_digits(Detector):
    rng = np.random.default_rng(1)
    for digit in ALL_DIGITS:
        for lead in (20.0, 21.3, 22.9, 24.1):      # different alignments with the 5 ms hop
            x, onset = burst(digit, lead_ms=lead, rng=rng)
            got = Detector().feed(x)
            assert [d for d, _ in got] == [digit], (digit, lead)
            assert abs(got[0][1] - onset) <= ONSET_TOLERANCE, (digit, got, onset)


def test_frequency_deviation_within_1_5_percent_detects(Detector):
    rng = np.random.default_rng(2)
    for digit in ALL_DIGITS:
        for dev in ((0.015, 0.015), (-0.015, -0.015), (0.015, -0.015), (-0.015, 0.015),
                    (0.015, 0.0), (0.0, -0.015)):
            x, _ = burst(digit, ms=60, dev=dev, rng=rng)
            assert digits(Detector, x) == digit, (digit, dev)


def test_frequency_deviation_of_3_5_percent_rejected(Detector):
    rng = np.random.default_rng(3)
    for digit in ALL_DIGITS:
        for dev in ((0.035, 0.0), (-0.035, 0.0), (0.0, 0.035), (0.0, -0.035),
                    (0.035, 0.035), (-0.035, -0.035), (0.035, -0.035), (-0.035, 0.035)):
            x, _ = burst(digit, ms=80, dev=dev, rng=rng)
            assert digits(Detector, x) == "", (digit, dev)


@pytest.mark.parametrize("row,col,detect", [
    (-4.0, -12.0, True),     # normal twist 8 dB: the column (high group) weaker
    (-8.0, -4.0, True),      # reverse twist 4 dB: the row (low group) weaker
    (-3.0, -13.0, False),    # normal twist 10 dB
    (-10.0, -4.0, False),    # reverse twist 6 dB
])
def test_twist(Detector, row, col, detect):
    rng = np.random.default_rng(4)
    for digit in ALL_DIGITS:
        x, _ = burst(digit, ms=60, row_dbm0=row, col_dbm0=col, rng=rng)
        assert digits(Detector, x) == (digit if detect else ""), (digit, row, col)


def test_duration_40ms_detects_23ms_never(Detector):
    rng = np.random.default_rng(5)
    for digit in ALL_DIGITS:
        for lead in np.linspace(20, 25, 7):        # sweep the tone across the hop grid
            x, _ = burst(digit, ms=40, lead_ms=lead, rng=rng)
            assert digits(Detector, x) == digit, (digit, lead)
            for short in (23, 20, 15, 10):
                x, _ = burst(digit, ms=short, lead_ms=lead, rng=rng)
                assert digits(Detector, x) == "", (digit, short, lead)


def test_pause_of_40ms_separates_repeated_digits(Detector):
    rng = np.random.default_rng(6)
    for digit in ALL_DIGITS:
        for lead in (20.0, 21.7, 23.4):
            x = pcm(np.concatenate([silence(lead), tone(digit, 50, rng=rng), silence(40),
                                    tone(digit, 50, rng=rng), silence(60)]))
            assert digits(Detector, x) == digit * 2, (digit, lead)


def test_dropout_of_10ms_is_one_digit(Detector):
    rng = np.random.default_rng(7)
    for digit in ALL_DIGITS:
        for _ in range(4):
            t = tone(digit, 150, rng=rng)
            cut = int(rng.integers(100, len(t) - 180))
            t[cut:cut + 80] = 0.0                    # 10 ms of nothing inside the tone
            x = pcm(np.concatenate([silence(21), t, silence(60)]))
            assert digits(Detector, x) == digit, (digit, cut)


@pytest.mark.parametrize("level", [0.0, -3.0, -10.0, -20.0, -25.0])
def test_level_range_detects(Detector, level):
    rng = np.random.default_rng(8)
    for digit in ALL_DIGITS:
        # At 0 dBm0 per tone the pair's peak exceeds 16 bits: pcm() clips, as a codec would.
        x, _ = burst(digit, row_dbm0=level, rng=rng)
        assert digits(Detector, x) == digit, (digit, level)


@pytest.mark.parametrize("level", [-35.0, -45.0])
def test_too_weak_rejected(Detector, level):
    rng = np.random.default_rng(9)
    for digit in ALL_DIGITS:
        x, _ = burst(digit, ms=80, row_dbm0=level, rng=rng)
        assert digits(Detector, x) == "", (digit, level)


def _noisy_trial(rng, snr_db=15.0):
    digit = ALL_DIGITS[rng.integers(16)]
    level = rng.uniform(-20.0, -4.0)
    t = tone(digit, 50, row_dbm0=level, rng=rng)
    # S/N: both tones' power over the white noise power in the whole 0-4 kHz band.
    signal_power = 2 * (DBM0 * 10 ** (level / 20)) ** 2 / 2
    x = np.concatenate([silence(100 + rng.uniform(0, 5)), t, silence(100)])
    x = x + rng.normal(0.0, np.sqrt(signal_power / 10 ** (snr_db / 10)), len(x))
    return digit, pcm(x)


def test_white_noise_15db_snr(Detector):
    rng = np.random.default_rng(10)
    trials = 200
    ok = 0
    for _ in range(trials):
        digit, x = _noisy_trial(rng)
        ok += digits(Detector, x) == digit
    print(f"15 dB S/N: {ok}/{trials} detected")
    assert ok >= 0.99 * trials


def test_noise_alone_yields_nothing(Detector):
    rng = np.random.default_rng(11)
    for sigma in (30.0, 300.0, 3000.0, 12000.0):
        x = pcm(rng.normal(0.0, sigma, FS * 10))
        assert Detector().feed(x) == [], sigma
    # Pink-ish (integrated) noise concentrates energy in the low group.
    x = np.cumsum(rng.normal(0.0, 400.0, FS * 10))
    x -= np.convolve(x, np.ones(64) / 64, mode="same")
    assert Detector().feed(pcm(x)) == []


def test_sequence_50ms_on_50ms_off(Detector):
    rng = np.random.default_rng(12)
    seq = "0123456789*#ABCD"
    x = pcm(np.concatenate([silence(30)] + [np.concatenate([tone(d, 50, rng=rng), silence(50)])
                                            for d in seq]))
    got = Detector().feed(x)
    assert "".join(d for d, _ in got) == seq
    for i, (_, onset) in enumerate(got):
        assert abs(onset - 240 - i * 800) <= ONSET_TOLERANCE


def test_tone_at_stream_start(Detector):
    # The first window has no phase reference, so the onset may be one 5 ms hop late.
    got = Detector().feed(pcm(np.concatenate([tone("5", 50), silence(50)])))
    assert [d for d, _ in got] == ["5"] and 0 <= got[0][1] <= 40 + ONSET_TOLERANCE


def _mixed_signal(seed=13):
    rng = np.random.default_rng(seed)
    parts = []
    for d in "159#0*D73B":
        parts += [silence(rng.uniform(45, 120)), tone(d, rng.uniform(40, 90), rng=rng)]
    parts.append(silence(80))
    x = np.concatenate(parts)
    return pcm(x + rng.normal(0, 200, len(x)))


@pytest.mark.parametrize("chunk", [1, 7, 160, 1000])
def test_chunking_does_not_matter(Detector, chunk):
    x = _mixed_signal()
    whole = Detector().feed(x)
    assert "".join(d for d, _ in whole) == "159#0*D73B"
    det = Detector()
    pieces = []
    for i in range(0, len(x), chunk):
        pieces += det.feed(x[i:i + chunk])
    assert pieces == whole


def test_reset_restarts_the_stream(Detector):
    x = _mixed_signal()
    det = Detector()
    first = det.feed(x[:3000])
    assert first == Detector().feed(x[:3000]) and first
    det.feed(x[3000:3100])                  # leave a digit half-seen
    det.reset()
    assert det.feed(x) == Detector().feed(x)


def test_input_forms(Detector):
    x = _mixed_signal()
    ref = Detector().feed(x)
    assert Detector().feed(x.astype("<i2").tobytes()) == ref
    assert Detector().feed(bytearray(x.astype("<i2").tobytes())) == ref
    assert Detector().feed(x.astype(">i2")) == ref
    assert Detector().feed(np.repeat(x, 2)[::2]) == ref
    det = Detector()
    assert det.feed(b"") == [] and det.rate == 8000
    with pytest.raises(ValueError):
        Detector().feed(b"\x00\x01\x02")
    with pytest.raises(TypeError):
        Detector().feed(x.astype(np.float64))
    with pytest.raises(ValueError):
        Detector(rate=8001)


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_detects_through_g711(Detector, law):
    rng = np.random.default_rng(14)
    enc, dec = getattr(g711, law + "_encode"), getattr(g711, law + "_decode")
    for level in (-3.0, -15.0, -25.0):
        x = pcm(np.concatenate([np.concatenate([tone(d, 50, row_dbm0=level, rng=rng), silence(50)])
                                for d in ALL_DIGITS]))
        y = np.frombuffer(dec(enc(x)), dtype="<i2")
        assert digits(Detector, y) == ALL_DIGITS, (law, level)


def test_wideband_rate(Detector):
    rng = np.random.default_rng(15)
    x = pcm(np.concatenate([np.concatenate([tone(d, 50, rng=rng, rate=16000), silence(50, 16000)])
                            for d in "9A*3"]))
    det = Detector(16000)
    assert det.rate == 16000
    got = det.feed(x)
    assert "".join(d for d, _ in got) == "9A*3"
    assert abs(got[1][1] - 1600) <= 2 * ONSET_TOLERANCE


def test_twins_agree():
    c = _c_module()
    rng = np.random.default_rng(16)
    for _ in range(40):
        _, x = _noisy_trial(rng, snr_db=float(rng.uniform(5, 15)))
        assert c.DtmfDetector().feed(x) == dtmf_py.DtmfDetector().feed(x)
    x = _mixed_signal(17)
    assert c.DtmfDetector().feed(x) == dtmf_py.DtmfDetector().feed(x)


def test_codecs_selection():
    base = {k: v for k, v in os.environ.items() if k != "BATON_NO_EXTENSIONS"}
    code = "from ext.kernels import dtmf as m; print(m.IMPLEMENTATION, m.DtmfDetector.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**base, "BATON_NO_EXTENSIONS": "1"}, check=True).stdout.split()
    assert out == ["py", "ext.dtmf_py"]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=base, check=True).stdout.split()
    try:
        import ext.dtmf  # noqa: F401
        assert out == ["c", "ext.dtmf"]
    except ImportError:
        assert out == ["py", "ext.dtmf_py"]


# --- Talk-off: synthesised speech must never produce a digit ----------------

WORDS = {
    "en": """the a an and or but if when while because although after before since until
        people time year day week month morning evening night world life hand part child eye
        woman man place work case point government company number group problem fact water
        money story book word family school student country state city question business
        service system program house room market telephone operator extension voicemail
        conference transfer call press pound star hash zero one two three four five six seven
        eight nine ten hundred thousand million first second third quickly slowly carefully
        suddenly quietly loudly happily almost always never often sometimes think know want
        say make take see come go look give use find tell ask seem feel try leave keep let
        begin help talk turn start show hear play run move like live believe hold bring happen
        write provide sit stand lose pay meet include continue set learn change lead understand
        watch follow stop create speak read allow add spend grow open walk win offer remember
        love consider appear buy wait serve die send expect build stay fall cut reach remain
        suggest raise pass sell require report decide pull breathe whisper shout sing laugh cry
        dance jump red green blue yellow orange purple black white silver golden bright dark
        heavy light warm cold river mountain ocean forest desert island valley garden bridge
        tower castle village harbour beautiful strange ordinary wonderful terrible important
        different possible available likely weather thunder lightning rain snow wind cloud
        sunshine storm breeze rainbow autumn winter music violin piano trumpet guitar drum
        orchestra symphony melody rhythm harmony chorus whistle chocolate vanilla strawberry
        banana pineapple coconut avocado broccoli cucumber tomato potato mississippi
        hippopotamus rhinoceros crocodile alligator elephant giraffe kangaroo penguin zebra
        eagle sparrow nightingale owl squirrel rabbit hedgehog butterfly dragonfly caterpillar
        physics chemistry biology mathematics philosophy psychology economics linguistics
        astronomy please thank you sorry hello goodbye welcome congratulations pardon""",
    "de": """der die das und oder aber wenn weil nicht ich du er sie wir ihr haben sein werden
        können müssen sagen machen geben kommen sollen wollen gehen wissen sehen lassen stehen
        finden bleiben liegen heißen denken nehmen tun dürfen glauben halten nennen mögen zeigen
        führen sprechen bringen leben fahren meinen fragen kennen gelten stellen spielen
        arbeiten brauchen folgen lernen bestehen verstehen setzen bekommen beginnen erzählen
        versuchen schreiben laufen Zeit Jahr Mensch Tag Hand Welt Stadt Haus Kind Frau Mann
        Schule Straße Wasser Telefon Nummer Apfel Brot Käse Wurst Bier Wein Kaffee Kuchen
        Milch zwischen schnell langsam heute morgen""",
    "fr": """le la les un une et ou mais si quand parce que je tu il elle nous vous ils être
        avoir faire dire pouvoir aller voir savoir vouloir venir devoir prendre trouver donner
        falloir parler mettre passer regarder aimer croire demander rester répondre entendre
        penser arriver connaître temps année jour homme femme enfant monde vie main maison
        ville pays eau téléphone numéro pain fromage vin café gâteau lait toujours jamais
        souvent aujourd'hui demain hier très bien""",
    "es": """el la los las un una y o pero si cuando porque yo tú él ella nosotros ser estar
        haber tener hacer poder decir ir ver dar saber querer llegar pasar deber poner parecer
        quedar creer hablar llevar dejar seguir encontrar llamar venir pensar salir volver
        tomar conocer vivir tiempo año día hombre mujer niño mundo vida mano casa ciudad país
        agua teléfono número pan queso vino café pastel leche siempre nunca hoy mañana ayer
        muy bien gracias hola""",
}
VOICES = [("en", "en"), ("en-us", "en"), ("en+f3", "en"), ("en+m3", "en"), ("en+f5", "en"),
          ("en-gb-scotland", "en"), ("en-us+klatt", "en"), ("de", "de"), ("fr", "fr"), ("es", "es")]
TALKOFF_PARAGRAPHS = 56          # about 36 minutes of speech
TALKOFF_MIN_MINUTES = 30.0


def _paragraph(rng: random.Random, words: list[str], n_words: int) -> str:
    out = []
    while n_words > 0:
        k = rng.randint(4, 14)
        s = " ".join(rng.choice(words) for _ in range(k))
        out.append(s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!", ","]))
        n_words -= k
    return " ".join(out)


def _talkoff_jobs():
    rng = random.Random(20240611)
    lists = {k: v.split() for k, v in WORDS.items()}
    jobs = []
    for i in range(TALKOFF_PARAGRAPHS):
        voice, lang = VOICES[i % len(VOICES)]
        jobs.append((voice, rng.randint(120, 260), rng.randint(20, 80),
                     _paragraph(rng, lists[lang], 110)))
    return jobs


def _render(job, path):
    voice, speed, pitch, text = job
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        raw = os.path.join(tmp, "speech.raw")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "-w", wav, text], check=True, capture_output=True)
        # espeak-ng writes 22.05 kHz; telephone audio is 8 kHz 16-bit. 3 dB of headroom
        # keeps the resampler from clipping.
        subprocess.run(["sox", "-V1", wav, "-r", "8000", "-b", "16", "-e", "signed-integer",
                        "-t", "raw", raw, "gain", "-3"], check=True, capture_output=True)
        os.replace(raw, path)     # atomic: a concurrent run never reads half a file


@pytest.fixture(scope="module")
def talkoff_speech():
    """About 36 minutes of varied synthesised speech at 8 kHz, cached between runs."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed for the talk-off corpus")
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    jobs = _talkoff_jobs()
    key = hashlib.sha256(repr((version, jobs)).encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("BATON_TEST_CACHE")
                         or os.path.join(tempfile.gettempdir(), "baton-test-cache"),
                         f"talkoff-{key}")
    os.makedirs(cache, exist_ok=True)
    paths = [os.path.join(cache, f"{i:03d}.raw") for i in range(len(jobs))]
    todo = [(j, p) for j, p in zip(jobs, paths) if not os.path.exists(p)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:   # two espeak/sox pipelines at once
        list(pool.map(lambda jp: _render(*jp), todo))
    return [np.fromfile(p, dtype="<i2") for p in paths]


@pytest.mark.timeout(600)
def test_talk_off_on_speech(Detector, talkoff_speech):
    det = Detector()
    found = []
    samples = 0
    for x in talkoff_speech:
        for i in range(0, len(x), FS):
            found += [(d, samples + i, onset) for d, onset in det.feed(x[i:i + FS])]
        samples += len(x)
    minutes = samples / FS / 60
    print(f"talk-off: {minutes:.1f} minutes of speech, {len(found)} detections")
    assert minutes >= TALKOFF_MIN_MINUTES
    assert found == []


def test_a_lost_20ms_frame_inside_a_tone_is_one_digit(Detector):
    """One RTP frame lost or late (20 ms of nothing, on the 20 ms frame grid) must not
    split a key into two: Q.24 leaves interruptions between 10 and 40 ms to the
    receiver, and over packet voice a single lost frame is the common one."""
    rng = np.random.default_rng(11)
    for digit in ALL_DIGITS:
        for frame in (2, 3, 4, 5):
            t = tone(digit, 160, rng=rng)
            t[frame * 160:(frame + 1) * 160] = 0.0
            for lead in (20.0, 21.7, 23.4):
                x = pcm(np.concatenate([silence(lead), t, silence(60)]))
                assert digits(Detector, x) == digit, (digit, frame, lead)
