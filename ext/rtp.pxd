# The named states of ext/rtp.pyx, the RTP relay and the media clock.
#
# C code compares these (`stream._mode == C_MODE_RELAY`); Python sees the
# same values as the IntEnums `Mode`, `Law` and `Source` of ext/rtp.pyx (and
# the module constants MODE_*, LAW_*, SOURCE_*), never a bare int.

cdef enum stream_mode:
    # What an RtpStream does with what it receives.
    C_MODE_IDLE = 0         # drops it (no remote yet, or being torn down)
    C_MODE_RELAY = 1        # forwards it out of its peer's socket (a bridge)
    C_MODE_TERMINATE = 2    # queues it for the media clock (a Channel)

cdef enum stream_law:
    # The G.711 law a stream sends (its negotiated payload type: 0 or 8).
    C_LAW_ULAW = 0
    C_LAW_ALAW = 1

cdef enum channel_source:
    # What a Channel sends on each tick of the media clock.
    C_SOURCE_SILENCE = 0    # a frame of silence
    C_SOURCE_PLAYER = 1     # the next frame of its Player (then SILENCE when it is done)
    C_SOURCE_ECHO = 2       # what it heard this tick
    C_SOURCE_NONE = 3       # nothing (the far end holds the call; digits being sent)
    C_SOURCE_MIXER = 4      # its conference's mix minus itself
