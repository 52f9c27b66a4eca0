# C-level entry points of ext/mix.pyx, the N-1 ("mix-minus") conference mixer.
#
# A Cython media loop drives a conference without a Python object per frame:
#
#     from ext.mix cimport Conference, conf_put_coded, conf_mix, conf_out_coded
#
#     slot = conf.add(pid, "ulaw")          # membership: Python level, rare
#     ...
#     with nogil:                           # every 20 ms tick
#         for each participant with a frame this tick:
#             conf_put_coded(conf, slot, payload)     # frame bytes, decoded here
#         conf_mix(conf)
#         for each participant:
#             send(conf_out_coded(conf, slot), n)   # n = frame, or 2 * frame for PCM
#
# Slots are small integers in [0, max_participants), returned by
# Conference.add() and by Conference.slot(pid); a slot stays the participant's
# until remove(), after which it may be handed to a newcomer.  Membership and
# flags (add, remove, set_muted, set_listen_only) change through the Python
# methods only.  Nothing here is locked: one thread owns a conference, and the
# Python methods must not run on it while these functions do.
#
# Sample format: PCM is native-order int16, exactly `frame` samples; coded
# frames are `frame` bytes of G.711 in the slot's law.
from libc.stdint cimport int16_t, int32_t, uint8_t

cdef enum:
    # A participant's law, on the wire in both directions.
    LAW_PCM = 0
    LAW_ULAW = 1
    LAW_ALAW = 2

cdef enum:
    # int32 accumulation of this many full-scale talkers cannot overflow.
    MAX_PARTICIPANTS_LIMIT = 65535

cdef enum:
    # What a slot's output of the last mix is.
    OUT_NONE = 0        # joined since: no output yet
    OUT_SHARED = 1      # a non-talker: the shared clipped sum
    OUT_OWN = 2         # a talker: its own row of _out / _coded


cdef class Conference:
    cdef readonly int max_participants
    cdef readonly int frame
    cdef int _count                   # slots in use
    cdef int16_t[:, ::1] _in          # decoded input of this tick, per slot
    cdef int16_t[:, ::1] _out         # own mix of each talker of the last tick
    cdef uint8_t[:, ::1] _coded       # the same, G.711-encoded for coded slots
    cdef int32_t[::1] _acc            # sum of every talker, one frame
    cdef int16_t[::1] _shared         # clipped sum: what every non-talker hears
    cdef uint8_t[:, ::1] _shared_coded  # _shared in each law, row = LAW_*
    cdef uint8_t[::1] _law            # LAW_* per slot
    cdef uint8_t[::1] _muted
    cdef uint8_t[::1] _listen_only
    cdef uint8_t[::1] _has_input      # put() this tick
    cdef uint8_t[::1] _used           # slot belongs to a participant
    cdef uint8_t[::1] _out_kind       # OUT_* of the last mix
    cdef int32_t[::1] _order          # slots in use, in joining order
    cdef list _pid                    # slot -> pid
    cdef dict _slot                   # pid -> slot

    cpdef int slot(self, object pid) except -1


# Copy one frame of native-order PCM into SLOT's input for this tick.
# Returns 0, or -1 if SLOT is not in use.  Whatever the slot's law.
cdef int conf_put_pcm(Conference c, int slot, const int16_t* pcm) noexcept nogil

# Decode one frame of G.711 (frame bytes, in SLOT's law) into SLOT's input.
# Returns 0, or -1 if SLOT is not in use or its law is LAW_PCM.
cdef int conf_put_coded(Conference c, int slot, const uint8_t* data) noexcept nogil

# Mix the tick: every slot's output becomes the clipped sum of all other
# talkers (in use, neither muted nor listen-only, input put this tick), and
# the inputs are cleared.  Returns the number of talkers.
cdef int conf_mix(Conference c) noexcept nogil

# SLOT's mixed PCM from the last conf_mix (frame samples), or NULL if SLOT is
# not in use or joined after it.  Valid until the next conf_mix; several slots may share it.
cdef const int16_t* conf_out_pcm(Conference c, int slot) noexcept nogil

# SLOT's output from the last conf_mix in its own law: frame G.711 bytes, or
# for LAW_PCM the native-order PCM (2 * frame bytes).  NULL if SLOT is not in
# use or joined after it.  Valid until the next conf_mix; several slots may share it.
cdef const uint8_t* conf_out_coded(Conference c, int slot) noexcept nogil
