"""Audio helpers for Play, Say and Record: WAV decoding, resampling, tones, speech."""
from __future__ import annotations

import asyncio
import math
import os
import shutil
import stat
import struct
import wave

import numpy as np
import pytest

from engine.media import signals, wav
from ext import g711_py as g711
from engine.media.tts import SpeechCache, espeak_voice
from engine.media.wav import AudioError

ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng not installed")


@pytest.fixture(autouse=True)
def _fresh_wav_cache():
    wav._wav_cache.clear()
    yield
    wav._wav_cache.clear()


# --------------------------------------------------------------------------- helpers


def sine(freq: float, rate: int, seconds: float = 1.0, amp: float = 10000.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def wav_bytes_wave(samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> bytes:
    """A PCM WAV written by the stdlib; samples are already in the target integer scale."""
    import io

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pack(samples, width))
    return buf.getvalue()


def pack(samples: np.ndarray, width: int) -> bytes:
    s = np.asarray(samples)
    if width == 1:
        return s.astype(np.uint8).tobytes()
    if width == 2:
        return s.astype("<i2").tobytes()
    if width == 3:
        v = s.astype(np.int64) & 0xFFFFFF
        return np.stack([v & 0xFF, (v >> 8) & 0xFF, v >> 16], axis=-1).astype(np.uint8).tobytes()
    return s.astype("<i4").tobytes()


def riff(tag: int, channels: int, rate: int, bits: int, data: bytes, *,
         extensible: bool = False, data_size: int | None = None, extra: bytes = b"") -> bytes:
    """A WAV assembled by hand, for formats `wave` cannot write."""
    block = channels * ((bits + 7) // 8)
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits,
                          22, bits, 0) + struct.pack("<H", tag) + guid_tail
    else:
        fmt = struct.pack("<HHIIHHH", tag, channels, rate, rate * block, block, bits, 0)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra
    if tag != 1:
        body += b"fact" + struct.pack("<II", 4, len(data) // block)
    size = len(data) if data_size is None else data_size
    body += b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", min(len(body), 0xFFFFFFFF)) + body


def peak_hz(y: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(y.astype(np.float64) * np.hanning(len(y))))
    return float(np.argmax(spec)) * rate / len(y)


def rms_db(y: np.ndarray) -> float:
    y = y.astype(np.float64)
    return 10 * math.log10(np.mean(y * y))


def middle(y: np.ndarray, edge: int = 400) -> np.ndarray:
    return y[edge:-edge]


def write_file(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("rate", [16000, 44100, 22050])
def test_resample_keeps_frequency_and_amplitude(rate):
    x = np.round(sine(1000, rate)).astype(np.int16)
    y = signals.resample(x, rate)
    assert y.dtype == np.int16 and len(y) == 8000
    assert peak_hz(y, 8000) == pytest.approx(1000, abs=1)
    assert rms_db(middle(y)) == pytest.approx(rms_db(x), abs=0.5)


@pytest.mark.parametrize("rate", [16000, 44100, 22050])
def test_wav_at_other_rates_is_resampled_on_read(tmp_path, rate):
    x = np.round(sine(1000, rate)).astype(np.int16)
    y = wav.read_wav(write_file(tmp_path / "a.wav", wav_bytes_wave(x, rate)))
    assert len(y) == 8000
    assert peak_hz(y, 8000) == pytest.approx(1000, abs=1)
    assert rms_db(middle(y)) == pytest.approx(rms_db(x), abs=0.5)


@pytest.mark.parametrize("rate,freq", [(44100, 5000), (44100, 4100), (16000, 5000), (22050, 7000)])
def test_resample_rejects_what_would_alias(rate, freq):
    x = sine(freq, rate)
    y = signals.resample(x, rate)
    # A 5 kHz tone would otherwise fold to 3 kHz, well inside the telephone band.
    assert rms_db(middle(y)) <= rms_db(x) - 40


def test_resample_up_keeps_tone_and_suppresses_image():
    x = np.round(sine(1000, 8000)).astype(np.int16)
    y = signals.resample(x, 8000, 16000)
    assert len(y) == 16000
    assert peak_hz(y, 16000) == pytest.approx(1000, abs=1)
    spec = np.abs(np.fft.rfft(middle(y, 800).astype(np.float64) * np.hanning(len(y) - 1600)))
    hz = np.fft.rfftfreq(len(y) - 1600, 1 / 16000)
    image = spec[(hz > 6900) & (hz < 7100)].max()
    assert 20 * math.log10(image / spec.max()) < -60


def test_resample_types_lengths_and_alignment():
    x = np.zeros(4410, dtype=np.float32)
    x[2205] = 30000.0
    y = signals.resample(x, 44100)
    assert y.dtype == np.float32 and len(y) == 800
    # The filter's delay is compensated: the impulse stays at the same time.
    assert int(np.argmax(y)) == 400
    assert len(signals.resample(np.zeros(1, np.int16), 44100)) == 1
    same = np.arange(-5, 5, dtype=np.int16)
    assert np.array_equal(signals.resample(same, 8000), same)
    dc = signals.resample(np.full(16000, 1000, np.int16), 16000)
    assert np.all(middle(dc) == 1000)
    with pytest.raises(ValueError):
        signals.resample(np.zeros((2, 10), np.int16), 16000)


def test_resample_long_input_crosses_blocks():
    # More output than one processing block, at a rate with many phases.
    x = sine(440, 22050, seconds=12)
    y = signals.resample(x, 22050)
    assert len(y) == 96000
    ref = sine(440, 8000, seconds=12)
    assert np.max(np.abs(middle(y) - middle(ref))) < 2.0


# --------------------------------------------------------------------------- reading WAV


def test_read_16bit_8k_is_exact(tmp_path):
    x = np.random.default_rng(1).integers(-32768, 32767, 8000).astype(np.int16)
    path = write_file(tmp_path / "x.wav", wav_bytes_wave(x, 8000))
    assert np.array_equal(wav.read_wav(path), x)
    assert np.array_equal(wav.read_wav(open(path, "rb").read()), x)


def test_read_8_24_32_bit(tmp_path):
    x = np.random.default_rng(2).integers(-32768, 32767, 1600).astype(np.int16)
    x8 = (x.astype(np.int32) >> 8) + 128                  # unsigned 8-bit
    y = wav.read_wav(wav_bytes_wave(x8, 8000, width=1))
    assert np.array_equal(y, ((x.astype(np.int32) >> 8) << 8).astype(np.int16))
    x24 = x.astype(np.int32) * 256 + 127                  # low byte below 16-bit resolution
    assert np.array_equal(wav.read_wav(wav_bytes_wave(x24, 8000, width=3)), x)
    x32 = x.astype(np.int64) * 65536 + 1000
    assert np.array_equal(wav.read_wav(wav_bytes_wave(x32, 8000, width=4)), x)


def test_read_24bit_extensible_at_48k():
    x = np.round(sine(1000, 48000, amp=8_000_000)).astype(np.int32)
    y = wav.read_wav(riff(1, 1, 48000, 24, pack(x, 3), extensible=True))
    assert len(y) == 8000
    assert peak_hz(y, 8000) == pytest.approx(1000, abs=1)
    assert rms_db(middle(y)) == pytest.approx(rms_db(x / 256), abs=0.5)


def test_stereo_is_averaged_to_mono():
    left = np.round(sine(1000, 8000, 0.2)).astype(np.int16)
    both = np.stack([left, left], axis=1).reshape(-1)
    assert np.array_equal(wav.read_wav(wav_bytes_wave(both, 8000, channels=2)), left)
    opposite = np.stack([left, -left], axis=1).reshape(-1)
    assert not np.any(wav.read_wav(wav_bytes_wave(opposite, 8000, channels=2)))
    only_left = np.stack([left, np.zeros_like(left)], axis=1).reshape(-1)
    y = wav.read_wav(wav_bytes_wave(only_left, 8000, channels=2))
    assert np.max(np.abs(y.astype(np.int32) - left / 2)) <= 0.5
    full = np.full(200, 32767, np.int16)
    assert np.all(wav.read_wav(wav_bytes_wave(np.stack([full, full], 1).reshape(-1), 8000, channels=2)) == 32767)


def test_stereo_at_44k1(tmp_path):
    left = np.round(sine(1000, 44100)).astype(np.int16)
    right = np.round(sine(1000, 44100, amp=5000)).astype(np.int16)
    data = wav_bytes_wave(np.stack([left, right], axis=1).reshape(-1), 44100, channels=2)
    y = wav.read_wav(write_file(tmp_path / "s.wav", data))
    assert len(y) == 8000 and peak_hz(y, 8000) == pytest.approx(1000, abs=1)
    assert rms_db(middle(y)) == pytest.approx(20 * math.log10(7500 / math.sqrt(2)), abs=0.5)


@pytest.mark.parametrize("tag,encode,decode", [
    (7, g711.ulaw_encode, g711.ulaw_decode),
    (6, g711.alaw_encode, g711.alaw_decode),
])
def test_g711_wav(tmp_path, tag, encode, decode):
    x = np.round(sine(440, 8000, 0.5)).astype(np.int16)
    codes = encode(x)
    want = np.frombuffer(decode(codes), dtype="<i2")
    path = write_file(tmp_path / "g.wav", riff(tag, 1, 8000, 8, codes))
    assert np.array_equal(wav.read_wav(path), want)
    assert np.array_equal(wav.read_wav(riff(tag, 1, 8000, 8, codes, extensible=True)), want)


def test_ulaw_header_written_by_hand(tmp_path):
    # The classic 18-byte fmt chunk, a LIST chunk of odd length (padded) before the data.
    codes = g711.ulaw_encode(np.round(sine(1000, 8000, 0.25)).astype(np.int16))
    fmt = struct.pack("<HHIIHHH", 7, 1, 8000, 8000, 1, 8, 0)
    info = b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\x00"
    body = (b"WAVE" + b"fmt " + struct.pack("<I", 18) + fmt + info
            + b"data" + struct.pack("<I", len(codes)) + codes)
    path = write_file(tmp_path / "u.wav", b"RIFF" + struct.pack("<I", len(body)) + body)
    y = wav.read_wav(path)
    assert len(y) == 2000 and peak_hz(y, 8000) == pytest.approx(1000, abs=4)


def test_float_wav():
    x = sine(1000, 16000, amp=0.5).astype("<f4")
    y = wav.read_wav(riff(3, 1, 16000, 32, x.tobytes()))
    assert rms_db(middle(y)) == pytest.approx(20 * math.log10(16384 / math.sqrt(2)), abs=0.5)


def test_float_wav_with_nan_and_infinity():
    x = np.array([0.5, np.nan, np.inf, -np.inf, 2.0, -0.25], dtype="<f4")
    y = wav.read_wav(riff(3, 1, 8000, 32, x.tobytes()))
    assert y.tolist() == [16384, 0, 32767, -32768, 32767, -8192]


def test_streamed_header_reads_what_is_there():
    x = np.arange(800, dtype=np.int16)
    data = riff(1, 1, 8000, 16, pack(x, 2), data_size=0xFFFFFFFF)
    assert np.array_equal(wav.read_wav(data), x)


def test_too_long_is_refused_from_the_header(tmp_path, monkeypatch):
    path = write_file(tmp_path / "long.wav", wav_bytes_wave(np.zeros(16000, np.int16), 8000))
    assert len(wav.read_wav(path, max_seconds=3)) == 16000

    def no_decoding(*args):
        raise AssertionError("decoded before checking the length")

    monkeypatch.setattr(wav, "_decode", no_decoding)
    with pytest.raises(AudioError, match="longer than the 1 s limit"):
        wav.read_wav(path, max_seconds=1)
    monkeypatch.setattr(wav, "MAX_SECONDS", 1.5)
    with pytest.raises(AudioError, match="limit"):
        wav.read_wav(path)


@pytest.mark.parametrize("data,message", [
    (b"", "not a WAV file"),
    (b"ID3\x03\x00" + b"\x00" * 100, "not a WAV file"),
    (b"RIFX" + b"\x00" * 40, "big-endian"),
    (b"RIFF\x04\x00\x00\x00WAVE", "no fmt chunk"),
    (riff(1, 1, 8000, 16, b"")[:36], "no data chunk"),
    (riff(1, 1, 8000, 16, b""), "no audio samples"),
    (riff(0x11, 1, 8000, 4, b"\x00" * 256), "unsupported WAV format tag 0x0011"),
    (riff(1, 1, 8000, 12, b"\x00" * 64), None),                      # 12-bit in 16: fine
    (riff(7, 1, 8000, 16, b"\x00" * 64), "unsupported mu-law sample size 16"),
    (riff(1, 0, 8000, 16, b"\x00" * 64), "channel count"),
    (riff(1, 1, 0, 16, b"\x00" * 64), "sample rate 0"),
    (riff(3, 1, 8000, 16, b"\x00" * 64), "unsupported IEEE float"),
    (riff(1, 1, 700001, 16, b"\x00" * 64), "too large a filter bank"),
])
def test_bad_files_raise_audio_error(data, message):
    if message is None:
        assert len(wav.read_wav(data)) == 32
        return
    with pytest.raises(AudioError, match=message):
        wav.read_wav(data)


def test_odd_sample_rate():
    x = np.round(sine(1000, 44101)).astype(np.int16)
    y = wav.read_wav(riff(1, 1, 44101, 16, pack(x, 2)))
    assert len(y) == 8000 and peak_hz(y, 8000) == pytest.approx(1000, abs=1)


def test_mangled_files_raise_only_audio_error():
    rng = np.random.default_rng(5)
    x = np.round(sine(300, 16000, 0.05)).astype(np.int16)
    originals = [
        wav_bytes_wave(np.stack([x, x], 1).reshape(-1), 16000, channels=2),
        riff(7, 1, 8000, 8, g711.ulaw_encode(x), extensible=True),
        riff(1, 1, 8000, 24, pack(x.astype(np.int32) << 8, 3), extra=b"LIST\x03\x00\x00\x00abc\x00"),
    ]
    for i in range(600):
        data = bytearray(originals[i % len(originals)])
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(0, 72))
            if 24 <= at < 28:
                continue                 # the sample rate: odd rates are slow to design, tested above
            data[at] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[:int(rng.integers(0, len(data)))]
        try:
            y = wav.read_wav(bytes(data), max_seconds=2)
        except AudioError as e:
            assert str(e)
        else:
            assert y.dtype == np.int16 and y.ndim == 1


def test_unreadable_paths(tmp_path):
    with pytest.raises(AudioError, match="cannot read"):
        wav.read_wav(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="cannot read"):
        wav.read_wav(tmp_path)
    assert issubclass(AudioError, ValueError)


async def test_load_wav_caches_by_mtime_and_size(tmp_path, monkeypatch):
    path = tmp_path / "p.wav"
    write_file(path, wav_bytes_wave(np.full(800, 7, np.int16), 8000))
    reads = []
    real = wav.read_wav
    monkeypatch.setattr(wav, "read_wav", lambda *a, **k: reads.append(a) or real(*a, **k))

    a, b = await asyncio.gather(wav.load_wav(path), wav.load_wav(str(path)))
    assert a is b and len(reads) == 1 and np.all(a == 7)
    assert not a.flags.writeable
    assert await wav.load_wav(path) is a and len(reads) == 1

    write_file(path, wav_bytes_wave(np.full(1600, 9, np.int16), 8000))
    c = await wav.load_wav(path)
    assert len(reads) == 2 and len(c) == 1600 and np.all(c == 9)
    with pytest.raises(AudioError, match="limit"):
        await wav.load_wav(path, max_seconds=0.1)
    with pytest.raises(AudioError, match="cannot read"):
        await wav.load_wav(tmp_path / "nope.wav")
    write_file(tmp_path / "junk.wav", b"junk")
    with pytest.raises(AudioError, match="not a WAV"):
        await wav.load_wav(tmp_path / "junk.wav")


# --------------------------------------------------------------------------- writing


async def test_write_wav_round_trip(tmp_path):
    x = np.random.default_rng(3).integers(-32768, 32767, 4000).astype(np.int16)
    path = tmp_path / "rec" / "calls" / "r.wav"
    await wav.write_wav(path, x)
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 4000)
    assert np.array_equal(wav.read_wav(path), x)
    assert os.listdir(path.parent) == ["r.wav"]              # no temp file left behind

    await wav.write_wav(path, np.array([0.4, 1e6, -1e6]), rate=16000)
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == 16000
        assert np.frombuffer(w.readframes(3), "<i2").tolist() == [0, 32767, -32768]


async def test_write_wav_failure_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(AudioError, match="cannot write"):
        await wav.write_wav(blocker / "r.wav", np.zeros(10, np.int16))
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as a user that ignores directory permissions")
        with pytest.raises(AudioError, match="cannot write"):
            await wav.write_wav(d / "r.wav", np.zeros(10, np.int16))
    finally:
        d.chmod(stat.S_IRWXU)


# --------------------------------------------------------------------------- tones and levels


def test_tone_frequency_and_level():
    t = signals.tone(1000, 1000, level_dbm0=-10)
    assert t.dtype == np.int16 and len(t) == 8000
    assert peak_hz(t, 8000) == pytest.approx(1000, abs=1)
    # A full-scale sine (peak 32767) is +3.14 dBm0.
    peak = math.sqrt(2) * 10 ** (rms_db(t) / 20)
    assert 20 * math.log10(peak / 32767) + 3.14 == pytest.approx(-10, abs=0.05)
    assert signals.frame_energy_dbfs(signals.tone(400, 500, 0)) == pytest.approx(
        20 * math.log10(32767 / 32768) - 3.14 - 3.01, abs=0.05)
    with pytest.raises(ValueError):
        signals.tone(5000, 100)
    with pytest.raises(ValueError):
        signals.tone(1000, 100, level_dbm0=6)


def test_beep_and_silence():
    b = signals.beep()
    assert len(b) == 2000 and peak_hz(b, 8000) == pytest.approx(1000, abs=4)
    assert abs(int(b[0])) < 50 and abs(int(b[-1])) < 500          # faded in and out
    assert signals.frame_energy_dbfs(b[400:1600]) == pytest.approx(signals.frame_energy_dbfs(signals.tone(1000, 150)), abs=0.1)
    s = signals.silence(300)
    assert s.dtype == np.int16 and len(s) == 2400 and not s.any()


def test_frame_energy_dbfs():
    square = np.where(np.arange(320) % 2, 32767, -32768).astype(np.int16)
    assert signals.frame_energy_dbfs(square) == pytest.approx(0, abs=0.01)
    assert signals.frame_energy_dbfs(np.zeros(160, np.int16)) == float("-inf")
    assert signals.frame_energy_dbfs(np.zeros(0, np.int16)) == float("-inf")
    levels = signals.frame_energy_dbfs(np.concatenate([np.zeros(160, np.int16), square[:200]]), frame=160)
    assert levels.shape == (3,) and levels[0] == float("-inf")
    assert levels[1] == pytest.approx(0, abs=0.01) and levels[2] == pytest.approx(0, abs=0.01)


def test_trim_silence():
    rng = np.random.default_rng(4)
    hiss = rng.normal(0, 30, 8000)                          # about -60 dBFS
    speech = signals.tone(500, 300, -20)
    x = np.round(np.concatenate([hiss[:4000], speech, hiss[4000:7200]])).astype(np.int16)
    y = signals.trim_silence(x)
    assert 2400 <= len(y) <= 2400 + 3 * 160
    assert signals.frame_energy_dbfs(y[:160]) < -45 and signals.frame_energy_dbfs(y[160:320]) > -45
    assert len(signals.trim_silence(x, margin=0)) == 2400
    assert len(signals.trim_silence(np.round(hiss).astype(np.int16))) == 0
    assert len(signals.trim_silence(speech)) == len(speech)


def test_media_engine_accepts_the_arrays():
    rtp = pytest.importorskip("ext.rtp")
    shared = signals.beep()
    shared.flags.writeable = False                      # as the caches hand them out
    for pcm in (shared, signals.trim_silence(np.concatenate([signals.silence(100), signals.beep()])),
                wav.read_wav(riff(1, 1, 16000, 16, pack(np.zeros(320, np.int16), 2)))):
        assert not rtp.Player(pcm).done


# --------------------------------------------------------------------------- speech


def test_voice_and_language_mapping():
    assert espeak_voice("man") == "en-us+m3"
    assert espeak_voice("woman") == "en-us+f3"
    assert espeak_voice("alice") == "en-us+f2"
    assert espeak_voice("woman", "de-DE") == "de+f3"
    assert espeak_voice("man", "en-GB") == "en-gb+m3"
    assert espeak_voice("alice", "fr-FR") == "fr+f2"
    assert espeak_voice("Polly.Joanna") == "en-us+f3"
    assert espeak_voice("Polly.Matthew-Neural") == "en-us+m3"
    assert espeak_voice("Polly.Brian") == "en-gb+m3"
    assert espeak_voice("Polly.Hans", "en-US") == "de+m3"          # the Polly voice fixes the language
    assert espeak_voice("Polly.Unheard") == "en-us+f3"
    assert espeak_voice("Google.es-ES-Standard-A") == "es+f3"
    assert espeak_voice("en") == "en"
    assert espeak_voice("en", "es-ES") == "es"
    assert espeak_voice("en-us+Alicia", "en-GB") == "en-gb+Alicia"
    assert espeak_voice("de") == "de"
    assert espeak_voice("en", "pt-BR") == "pt-br"
    for bad in ["../../etc/passwd", "-w", "en+f3;rm", ""]:
        with pytest.raises(AudioError, match="unknown voice"):
            espeak_voice(bad)
    with pytest.raises(AudioError, match="unknown language"):
        espeak_voice("man", "x y")


def counting_espeak(tmp_path) -> tuple[str, str]:
    """A wrapper around espeak-ng that logs its arguments, one line per run."""
    log = tmp_path / "espeak.log"
    script = tmp_path / "espeak-counting"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{ESPEAK}" "$@"\n')
    script.chmod(0o755)
    return str(script), str(log)


def renders_logged(log: str) -> int:
    if not os.path.exists(log):
        return 0
    with open(log) as f:
        return sum(" -w " in line for line in f)


@needs_espeak
async def test_say_renders_real_speech_and_caches(tmp_path):
    espeak, log = counting_espeak(tmp_path)
    cache = SpeechCache(tmp_path / "tts", espeak=espeak)
    text = "Hello, thank you for calling. Please hold."
    pcm = await cache.say(text)
    assert pcm.dtype == np.int16
    assert 1.5 < len(pcm) / 8000 < 6.0
    assert signals.frame_energy_dbfs(pcm) > -35
    loud = signals.frame_energy_dbfs(pcm, 160) > -45
    assert loud.mean() > 0.4                                   # mostly speech, not silence
    assert cache.characters == len(text) and cache.renders == 1 and renders_logged(log) == 1
    path = cache.path_for(text)
    assert os.path.exists(path)
    with wave.open(path, "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
    assert not [n for n in os.listdir(tmp_path / "tts") if n.startswith(".")]

    again = await cache.say(text)
    assert again is pcm and cache.renders == 1 and cache.hits == 1 and renders_logged(log) == 1
    assert cache.characters == len(text)

    # A fresh cache on the same directory reads the file: no espeak-ng at all.
    cold = SpeechCache(tmp_path / "tts", espeak=str(tmp_path / "no-such-espeak"))
    from_disk = await cold.say(text)
    assert np.array_equal(from_disk, pcm) and cold.renders == 0 and cold.hits == 1

    other = await cache.say(text, voice="woman", rate_wpm=200, pitch=70)
    assert cache.renders == 2 and len(other) < len(pcm)


@needs_espeak
async def test_concurrent_identical_requests_render_once(tmp_path):
    espeak, log = counting_espeak(tmp_path)
    cache = SpeechCache(tmp_path, espeak=espeak)
    a, b, c = await asyncio.gather(cache.say("one two three"), cache.say("one two three"),
                                   cache.say("one two three", voice="en"))
    assert a is b is c
    assert renders_logged(log) == 1 and cache.renders == 1 and cache.characters == len("one two three")


@needs_espeak
async def test_one_waiter_cancelled_does_not_cancel_the_other(tmp_path):
    cache = SpeechCache(tmp_path)
    first = asyncio.ensure_future(cache.say("patience is a virtue"))
    second = asyncio.ensure_future(cache.say("patience is a virtue"))
    await asyncio.sleep(0)
    first.cancel()
    pcm = await second
    assert len(pcm) > 4000 and cache.renders == 1
    with pytest.raises(asyncio.CancelledError):
        await first


@needs_espeak
async def test_unknown_voice_or_variant(tmp_path):
    cache = SpeechCache(tmp_path)
    with pytest.raises(AudioError, match="'xx-nosuch'"):
        await cache.say("hello", voice="xx-nosuch")
    # espeak-ng itself would quietly fall back to the default variant here.
    with pytest.raises(AudioError, match="'en\\+nosuchvariant'.*variant 'nosuchvariant'"):
        await cache.say("hello", voice="en+nosuchvariant")
    with pytest.raises(AudioError, match="unknown voice"):
        await cache.say("hello", language="zz-ZZ")
    assert cache.characters == 0
    assert not os.listdir(tmp_path)


@needs_espeak
async def test_languages_render(tmp_path):
    cache = SpeechCache(tmp_path, max_concurrent=3)
    de, fr, es = await asyncio.gather(
        cache.say("Guten Tag, wie geht es Ihnen?", voice="woman", language="de-DE"),
        cache.say("Bonjour, comment allez-vous?", language="fr-FR"),
        cache.say("Buenos días, ¿cómo está?", voice="Polly.Conchita"))
    for pcm in (de, fr, es):
        assert len(pcm) > 4000 and signals.frame_energy_dbfs(pcm) > -35
    assert cache.characters == sum(map(len, ["Guten Tag, wie geht es Ihnen?", "Bonjour, comment allez-vous?",
                                             "Buenos días, ¿cómo está?"]))


async def test_say_limits_checked_before_running_anything(tmp_path):
    cache = SpeechCache(tmp_path, espeak=str(tmp_path / "no-such-espeak"), max_chars=50)
    with pytest.raises(AudioError, match="over the 50 limit"):
        await cache.say("x" * 51)
    with pytest.raises(AudioError, match="empty"):
        await cache.say("   ")
    with pytest.raises(AudioError, match="rate"):
        await cache.say("hi", rate_wpm=20)
    with pytest.raises(AudioError, match="pitch"):
        await cache.say("hi", pitch=150)
    assert SpeechCache(tmp_path).max_chars == 4000
    with pytest.raises(AudioError, match="cannot run"):
        await cache.say("hi")
    assert cache.renders == 1 and cache.characters == 0


async def test_render_timeout(tmp_path):
    slow = tmp_path / "slow-espeak"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    cache = SpeechCache(tmp_path / "c", espeak=str(slow), timeout=0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(AudioError, match="longer than 0.3 s"):
        await cache.say("hello")
    assert loop.time() - t0 < 5
    assert not os.listdir(tmp_path / "c")


@needs_espeak
async def test_corrupt_cache_file_is_rerendered(tmp_path):
    cache = SpeechCache(tmp_path)
    path = cache.path_for("fresh start")
    os.makedirs(tmp_path, exist_ok=True)
    write_file(path, b"RIFF garbage")
    pcm = await cache.say("fresh start")
    assert len(pcm) > 2000 and cache.renders == 1
    assert np.array_equal(wav.read_wav(path), pcm)
