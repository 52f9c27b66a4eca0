"""In-band DTMF detector (ITU-T Q.23 / Q.24): C hot path.

Twin of `ext/dtmf_py.py`, which documents the algorithm and its
thresholds; both report the same digits at the same onsets. Per 5 ms hop the
windowed DFT at the eight DTMF frequencies is one pass over the 20 ms window
with sixteen independent accumulators; second harmonics are computed only for
windows that already passed every other check.
"""
import sys

import numpy

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport M_PI, atan2, cos, fabs, pow, sin, sqrt
from libc.stdint cimport int16_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memmove, memset

cdef const char* _KEYS = b"123A456B789C*0#D"
cdef double[4] _ROWS = [697.0, 770.0, 852.0, 941.0]
cdef double[4] _COLS = [1209.0, 1336.0, 1477.0, 1633.0]

# Thresholds: see ext/dtmf_py.py for where each comes from in Q.24.
cdef double FREQ_TOL = 0.025
cdef double TWIST_NORMAL_DB = 9.0
cdef double TWIST_REVERSE_DB = 5.0
cdef double MIN_LEVEL_DBM0 = -30.0
cdef double ENERGY_RATIO = 0.88
cdef double NEIGHBOUR_DB = 6.0
cdef double HARMONIC_DB = 10.0
cdef double DRIFT_HZ = 6.0

cdef double _NEIGHBOUR = pow(10.0, NEIGHBOUR_DB / 10.0)
cdef double _HARMONIC = pow(10.0, HARMONIC_DB / 10.0)
cdef double _TWIST_NORMAL = pow(10.0, -TWIST_NORMAL_DB / 10.0)
cdef double _TWIST_REVERSE = pow(10.0, TWIST_REVERSE_DB / 10.0)
# G.711: a full-scale sine is +3.14 dBm0.
cdef double DBM0_AMPLITUDE = 32768.0 * pow(10.0, -3.14 / 20.0)
cdef double _PMIN = (DBM0_AMPLITUDE * pow(10.0, MIN_LEVEL_DBM0 / 20.0)) ** 2 / 2.0

cdef dtmf_config _CFG8K
cdef bint _BIG_ENDIAN = sys.byteorder == "big"


cdef void _config_free(dtmf_config* cfg) noexcept nogil:
    free(cfg.table)
    free(cfg.harm)
    free(cfg.w2)
    cfg.table = NULL
    cfg.harm = NULL
    cfg.w2 = NULL


cdef int _config_build(dtmf_config* cfg, int rate) noexcept nogil:
    cdef int n, j, W
    cdef double w, om, sw = 0.0, sw2 = 0.0
    if rate % 200 or rate < 4000 or rate > 48000:
        return -1
    W = rate // 50
    cfg.rate = rate
    cfg.W = W
    cfg.H = rate // 200
    cfg.onset_bias = 17 * W // 160
    cfg.table = <double*>malloc(W * 16 * sizeof(double))
    cfg.harm = <double*>malloc(W * 16 * sizeof(double))
    cfg.w2 = <double*>malloc(W * sizeof(double))
    if cfg.table == NULL or cfg.harm == NULL or cfg.w2 == NULL:
        _config_free(cfg)
        return -1
    for j in range(4):
        cfg.freqs[j] = _ROWS[j]
        cfg.freqs[4 + j] = _COLS[j]
    for j in range(8):
        cfg.freqs[8 + j] = 2.0 * cfg.freqs[j]
    for n in range(W):
        w = 0.5 - 0.5 * cos(2.0 * M_PI * (n + 0.5) / W)
        sw += w
        cfg.w2[n] = w * w
        sw2 += w * w
        for j in range(8):
            om = 2.0 * M_PI * cfg.freqs[j] / rate
            cfg.table[n * 16 + j] = w * cos(om * n)
            cfg.table[n * 16 + 8 + j] = w * sin(om * n)
            om = 2.0 * M_PI * cfg.freqs[8 + j] / rate
            cfg.harm[(2 * j) * W + n] = w * cos(om * n)
            cfg.harm[(2 * j + 1) * W + n] = w * sin(om * n)
    for j in range(8):
        om = 2.0 * M_PI * cfg.freqs[j] / rate
        cfg.rot_re[j] = cos(-om * cfg.H)
        cfg.rot_im[j] = sin(-om * cfg.H)
        cfg.theta_max[j] = 2.0 * M_PI * FREQ_TOL * cfg.freqs[j] * cfg.H / rate
    cfg.norm_p = 2.0 / (sw * sw)
    cfg.norm_e = 1.0 / sw2
    cfg.hz_per_rad = rate / (2.0 * M_PI * cfg.H)
    cfg.bin_hz = <double>rate / W
    return 0


if _config_build(&_CFG8K, 8000) != 0:
    raise MemoryError()


cdef inline double _hann_gain(double d) noexcept nogil:
    # Amplitude response of the Hann window d bins off centre: sinc(d) / (1 - d^2).
    cdef double den = 1.0 - d * d
    cdef double y
    if fabs(den) < 1e-6:
        return 0.5
    y = M_PI * (d if d != 0.0 else 1.0e-20)
    return fabs(sin(y) / y / den)


cdef int dtmf_init(dtmf_state* st, int rate) noexcept nogil:
    memset(st, 0, sizeof(dtmf_state))
    if rate == 8000:
        st.cfg = &_CFG8K
    else:
        st.own_cfg = <dtmf_config*>malloc(sizeof(dtmf_config))
        if st.own_cfg == NULL:
            return -1
        memset(st.own_cfg, 0, sizeof(dtmf_config))
        if _config_build(st.own_cfg, rate) != 0:
            free(st.own_cfg)
            st.own_cfg = NULL
            return -1
        st.cfg = st.own_cfg
    st.buf = <double*>malloc(st.cfg.W * sizeof(double))
    if st.buf == NULL:
        dtmf_free(st)
        return -1
    dtmf_reset(st)
    return 0


cdef void dtmf_free(dtmf_state* st) noexcept nogil:
    free(st.buf)
    st.buf = NULL
    if st.own_cfg != NULL:
        _config_free(st.own_cfg)
        free(st.own_cfg)
        st.own_cfg = NULL
    st.cfg = NULL


cdef void dtmf_reset(dtmf_state* st) noexcept nogil:
    st.fill = 0
    st.k = 0
    st.have_prev = 0
    st.cand = -1
    st.run = 0
    st.first = 0
    st.on = -1
    st.miss = 0
    st.dropped = 0


cdef Py_ssize_t dtmf_max_events(const dtmf_state* st, Py_ssize_t n) noexcept nogil:
    return (st.fill + n) // st.cfg.H + 1


cdef int _window(dtmf_state* st, double* dr, double* dc) noexcept nogil:
    """Classify the full window in st.buf: the digit index 0..15, or -1."""
    cdef const dtmf_config* cfg = st.cfg
    cdef int W = cfg.W
    cdef int n, j, r, c
    cdef double acc[16]
    cdef double P[8]
    cdef double xr[8]
    cdef double xi[8]
    cdef double xv, e = 0.0
    cdef const double* row
    cdef const double* b = st.buf
    cdef double pr, pc, prt, pct, a, bb, lre, lim, ar, ac, g, hr, hc, hre, him, leak
    cdef const double* hcos
    cdef const double* hsin
    cdef int have_prev = st.have_prev

    for j in range(16):
        acc[j] = 0.0
    # One pass, sixteen independent sums: the compiler can keep them in registers.
    for n in range(W):
        xv = b[n]
        row = cfg.table + n * 16
        for j in range(16):
            acc[j] += xv * row[j]
        e += xv * xv * cfg.w2[n]
    e *= cfg.norm_e
    for j in range(8):
        xr[j] = acc[j]
        xi[j] = -acc[8 + j]
        P[j] = (xr[j] * xr[j] + xi[j] * xi[j]) * cfg.norm_p

    # Keep this window's phases for the next one, whatever the verdict.
    cdef double pre[8]
    cdef double pim[8]
    for j in range(8):
        pre[j] = st.prev_re[j]
        pim[j] = st.prev_im[j]
        st.prev_re[j] = xr[j]
        st.prev_im[j] = xi[j]
    st.have_prev = 1
    if not have_prev:
        return -1

    r = 0
    for j in range(1, 4):
        if P[j] > P[r]:
            r = j
    c = 4
    for j in range(5, 8):
        if P[j] > P[c]:
            c = j
    pr = P[r]
    pc = P[c]
    if pr < _PMIN or pc < _PMIN:
        return -1
    for j in range(4):
        if j != r and P[j] * _NEIGHBOUR > pr:
            return -1
        if 4 + j != c and P[4 + j] * _NEIGHBOUR > pc:
            return -1

    # Phase advance since the previous window gives the frequency offset.
    a = xr[r] * pre[r] + xi[r] * pim[r]
    bb = xr[r] * (-pim[r]) + xi[r] * pre[r]
    lre = a * cfg.rot_re[r] - bb * cfg.rot_im[r]
    lim = a * cfg.rot_im[r] + bb * cfg.rot_re[r]
    ar = atan2(lim, lre)
    if fabs(ar) > cfg.theta_max[r]:
        return -1
    a = xr[c] * pre[c] + xi[c] * pim[c]
    bb = xr[c] * (-pim[c]) + xi[c] * pre[c]
    lre = a * cfg.rot_re[c] - bb * cfg.rot_im[c]
    lim = a * cfg.rot_im[c] + bb * cfg.rot_re[c]
    ac = atan2(lim, lre)
    if fabs(ac) > cfg.theta_max[c]:
        return -1
    dr[0] = ar * cfg.hz_per_rad
    dc[0] = ac * cfg.hz_per_rad

    g = _hann_gain(dr[0] / cfg.bin_hz)
    prt = pr / (g * g)
    g = _hann_gain(dc[0] / cfg.bin_hz)
    pct = pc / (g * g)
    if not (pct >= prt * _TWIST_NORMAL and pct <= prt * _TWIST_REVERSE):
        return -1
    if not (prt + pct >= ENERGY_RATIO * e):
        return -1

    # Second harmonics, only now that the window looks like a digit.
    hre = 0.0
    him = 0.0
    hcos = cfg.harm + (2 * r) * W
    hsin = cfg.harm + (2 * r + 1) * W
    for n in range(W):
        hre += b[n] * hcos[n]
        him += b[n] * hsin[n]
    hr = (hre * hre + him * him) * cfg.norm_p
    hre = 0.0
    him = 0.0
    hcos = cfg.harm + (2 * c) * W
    hsin = cfg.harm + (2 * c + 1) * W
    for n in range(W):
        hre += b[n] * hcos[n]
        him += b[n] * hsin[n]
    hc = (hre * hre + him * him) * cfg.norm_p
    # The row harmonic bin also holds the column tone's main-lobe leakage.
    leak = sqrt(pct) * _hann_gain((cfg.freqs[c] + dc[0] - cfg.freqs[8 + r]) / cfg.bin_hz)
    hr = sqrt(hr) - leak
    if hr < 0.0:
        hr = 0.0
    hr = hr * hr
    if not (hr * _HARMONIC <= prt and hc * _HARMONIC <= pct):
        return -1
    return 4 * r + (c - 4)


cdef int _track(dtmf_state* st, int d, double dr, double dc) noexcept nogil:
    """Advance the digit state machine by one window; return a digit index when one is detected."""
    cdef int i, slot
    cdef double lo_r, hi_r, lo_c, hi_c
    if d >= 0 and d == st.cand:
        st.run += 1
    else:
        st.cand = d
        st.run = 1 if d >= 0 else 0
        st.first = st.k
    if d >= 0:
        slot = (st.run - 1) % DTMF_ON_WINDOWS
        st.offs_r[slot] = dr
        st.offs_c[slot] = dc
    if st.on >= 0:
        if d == st.on:
            st.miss = 0
        else:
            st.miss += 1
            if st.miss >= DTMF_OFF_WINDOWS:
                st.on = -1
    if st.on < 0 and st.cand >= 0 and st.run >= DTMF_ON_WINDOWS:
        # Keys are crystal-stable; speech harmonics glide.
        lo_r = hi_r = st.offs_r[0]
        lo_c = hi_c = st.offs_c[0]
        for i in range(1, DTMF_ON_WINDOWS):
            lo_r = min(lo_r, st.offs_r[i])
            hi_r = max(hi_r, st.offs_r[i])
            lo_c = min(lo_c, st.offs_c[i])
            hi_c = max(hi_c, st.offs_c[i])
        if hi_r - lo_r <= DRIFT_HZ and hi_c - lo_c <= DRIFT_HZ:
            st.on = st.cand
            st.miss = 0
            return st.cand
    return -1


cdef int dtmf_process(dtmf_state* st, const int16_t* pcm, Py_ssize_t n,
                      dtmf_event* events, int max_events) noexcept nogil:
    cdef const dtmf_config* cfg = st.cfg
    cdef Py_ssize_t i = 0, j, take
    cdef int nev = 0, d
    cdef double dr = 0.0, dc = 0.0
    while i < n:
        take = cfg.W - st.fill
        if take > n - i:
            take = n - i
        for j in range(take):
            st.buf[st.fill + j] = pcm[i + j]
        st.fill += <int>take
        i += take
        if st.fill < cfg.W:
            break
        d = _window(st, &dr, &dc)   # sets dr, dc: keep it a statement of its own
        d = _track(st, d, dr, dc)
        if d >= 0:
            if nev < max_events:
                events[nev].digit = _KEYS[d]
                events[nev].onset = st.first * cfg.H + cfg.onset_bias
                nev += 1
            else:
                st.dropped += 1
        memmove(st.buf, st.buf + cfg.H, (cfg.W - cfg.H) * sizeof(double))
        st.fill = cfg.W - cfg.H
        st.k += 1
    return nev


cdef object _pcm(object pcm):
    cdef object arr
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raw = memoryview(pcm).cast("B")
        if raw.nbytes % 2:
            raise ValueError("16-bit PCM needs an even number of bytes")
        if _BIG_ENDIAN:
            return numpy.frombuffer(raw, dtype="<i2").astype(numpy.int16)
        return raw.cast("h")
    arr = numpy.asarray(pcm)
    if arr.dtype.kind != "i" or arr.dtype.itemsize != 2:
        raise TypeError(f"expected bytes or an int16 array, not {arr.dtype}")
    return numpy.ascontiguousarray(arr.reshape(-1), dtype=numpy.int16)


cdef class DtmfDetector:
    """Streaming DTMF detector for one channel of 16-bit linear PCM.

    `feed(pcm)` takes any number of samples (little-endian bytes or an int16
    array) and returns the digits whose detection completed in them, as
    `(digit, onset)` with `onset` the estimated first sample of the tone,
    counted from the start of the stream (or the last `reset()`), within
    about 3 ms (one 5 ms hop later for a tone already present at sample 0).
    Each key press is reported exactly once. One instance serves one
    channel and is not to be fed from two threads at once.
    """
    cdef dtmf_state st

    def __cinit__(self, int rate=8000):
        if rate % 200 or rate < 4000 or rate > 48000:
            raise ValueError("rate must be a multiple of 200 Hz between 4000 and 48000")
        if dtmf_init(&self.st, rate) != 0:
            raise MemoryError()

    def __dealloc__(self):
        dtmf_free(&self.st)

    @property
    def rate(self):
        return self.st.cfg.rate

    def reset(self):
        """Forget all audio and any digit in progress; onsets restart at 0."""
        dtmf_reset(&self.st)

    def feed(self, pcm):
        """Process more samples; return the newly detected `(digit, onset_sample)` pairs."""
        cdef const int16_t[::1] src = _pcm(pcm)
        cdef Py_ssize_t n = src.shape[0]
        cdef Py_ssize_t cap
        cdef dtmf_event stack_ev[16]
        cdef dtmf_event* ev = stack_ev
        cdef int nev, i
        if n == 0:
            return []
        cap = dtmf_max_events(&self.st, n)
        if cap > 16:
            ev = <dtmf_event*>PyMem_Malloc(cap * sizeof(dtmf_event))
            if ev == NULL:
                raise MemoryError()
        try:
            with nogil:
                nev = dtmf_process(&self.st, &src[0], n, ev, <int>cap)
            return [(chr(ev[i].digit), ev[i].onset) for i in range(nev)]
        finally:
            if ev != stack_ev:
                PyMem_Free(ev)
