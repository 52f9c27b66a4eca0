# C-level in-band DTMF detector (ITU-T Q.24), usable per channel without
# Python objects from a media loop:
#
#   from ext.dtmf cimport dtmf_state, dtmf_event, dtmf_init, dtmf_process, dtmf_free
#   cdef dtmf_state st
#   cdef dtmf_event ev[8]
#   dtmf_init(&st, 8000)                 # 0 on success
#   n = dtmf_process(&st, frame, 160, ev, 8)
#   dtmf_free(&st)
#
# dtmf_process reports at most one event per 5 ms hop: size `events` for
# dtmf_max_events(&st, n) so none is dropped. Everything here is nogil.
from libc.stdint cimport int16_t, int64_t

cdef enum:
    DTMF_BINS = 8          # 4 row + 4 column tones
    DTMF_ON_WINDOWS = 4    # consecutive hits that make a digit
    DTMF_OFF_WINDOWS = 9   # consecutive misses that end it

ctypedef struct dtmf_config:
    int rate
    int W                  # window, 20 ms
    int H                  # hop, 5 ms
    int onset_bias         # samples from the first hit window's start to the tone onset
    double* table          # W rows of [w cos(wn) x8, w sin(wn) x8] at the fundamentals
    double* harm           # 8 harmonics x {cos, sin} x W, window applied
    double* w2             # squared window, for the windowed energy
    double freqs[16]       # fundamentals, then their second harmonics
    double rot_re[8]       # exp(-j w H): the phase advance of an on-frequency tone per hop
    double rot_im[8]
    double theta_max[8]    # largest phase error accepted (2.5 % of nominal)
    double hz_per_rad
    double bin_hz
    double norm_p
    double norm_e

ctypedef struct dtmf_event:
    char digit             # one of "0123456789*#ABCD"
    int64_t onset          # first sample of the tone, from the start of the stream

ctypedef struct dtmf_state:
    const dtmf_config* cfg
    dtmf_config* own_cfg   # tables owned by this state (rates other than 8000)
    double* buf            # the current window's samples
    int fill
    int64_t k              # index of the window being filled; it starts at k*H
    int have_prev
    double prev_re[8]
    double prev_im[8]
    int cand
    int run
    int64_t first
    int on
    int miss
    double offs_r[DTMF_ON_WINDOWS]
    double offs_c[DTMF_ON_WINDOWS]
    int64_t dropped        # events lost to a too-small events array

cdef int dtmf_init(dtmf_state* st, int rate) noexcept nogil
cdef void dtmf_free(dtmf_state* st) noexcept nogil
cdef void dtmf_reset(dtmf_state* st) noexcept nogil
cdef Py_ssize_t dtmf_max_events(const dtmf_state* st, Py_ssize_t n) noexcept nogil
cdef int dtmf_process(dtmf_state* st, const int16_t* pcm, Py_ssize_t n,
                      dtmf_event* events, int max_events) noexcept nogil
