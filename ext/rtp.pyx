# cython: language_level=3
"""RTP streams, the relay, and the media clock (RFC 3550, RFC 4733).

Every leg's RTP socket is an `RtpStream`. All streams sit in one epoll set
owned by the `RtpHub`; the event loop watches only the epoll fd, and on
readiness `RtpHub.poll()` drains every ready socket in C with `recvmmsg`:
- a stream in RELAY mode forwards its packets straight out of its peer's
  socket with `sendmmsg`, rewriting SSRC, sequence number and timestamp so
  the far end sees one continuous stream whatever fed it before;
- a stream in TERMINATE mode queues the audio payload (and RFC 4733 events)
  for the media clock.
`MediaClock.tick()` runs every 20 ms over all terminating channels: takes a
frame in (decode), hands it to the recorder, and sends a frame out (player,
echo or silence). No Python object is created per packet.
"""
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, memcmp
from libc.stdlib cimport rand, srand

from ext.includes.sockets cimport (sockaddr, sockaddr_storage, sockaddr_in, sockaddr_in6,
                                   socklen_t, iovec, msghdr, mmsghdr, timespec, recvmmsg,
                                   sendmmsg, sendto, recvfrom, MSG_DONTWAIT, AF_INET, AF_INET6, htons,
                                   ntohs, htonl, ntohl, inet_pton, errno, EAGAIN, EINTR,
                                   clock_gettime, CLOCK_MONOTONIC, cmsghdr, CMSG_FIRSTHDR,
                                   CMSG_NXTHDR, CMSG_DATA, setsockopt, SOL_SOCKET,
                                   SO_TIMESTAMPNS, SCM_TIMESTAMPNS)
from ext.includes.epoll cimport (epoll_event, epoll_create1, epoll_ctl, epoll_wait, EPOLLIN,
                                 EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CLOEXEC, close)
from ext.g711 cimport ulaw_encode_buffer, ulaw_decode_buffer, alaw_encode_buffer, alaw_decode_buffer
from ext.mix cimport Conference, conf_put_pcm, conf_mix, conf_out_pcm
from ext.dtmf cimport dtmf_state, dtmf_event, dtmf_init, dtmf_process, dtmf_free
from libc.stdlib cimport malloc, free, realloc
from ext.includes.pthread cimport (pthread_t, pthread_mutex_t, pthread_cond_t, pthread_create,
                                   pthread_join, pthread_mutex_init, pthread_mutex_destroy,
                                   pthread_mutex_lock, pthread_mutex_unlock, pthread_cond_init,
                                   pthread_cond_destroy, pthread_cond_wait, pthread_cond_signal,
                                   pthread_cond_broadcast)

import enum as _enum
import os
import socket as _socket

cdef enum:
    BATCH = 64
    MAXPKT = 1500
    FRAME = 160          # samples per 20 ms at 8 kHz
    FIFO = 1600          # queued G.711 octets per stream: 200 ms
    MAXEVENTS = 256
    MAX_BATCHES = 8      # recvmmsg batches per stream per wake-up
    CTRL = 64            # control bytes per datagram: one SCM_TIMESTAMPNS (cmsghdr + timespec)

# The enums (stream_mode, stream_law, channel_source) are declared in ext/rtp.pxd.


class Mode(_enum.IntEnum):
    """What a stream does with what it receives (`RtpStream.mode`)."""
    IDLE = C_MODE_IDLE
    RELAY = C_MODE_RELAY
    TERMINATE = C_MODE_TERMINATE


class Law(_enum.IntEnum):
    """The G.711 law a stream sends (`RtpStream.law`)."""
    ULAW = C_LAW_ULAW
    ALAW = C_LAW_ALAW


class Source(_enum.IntEnum):
    """What a channel sends on each tick (`Channel.source`)."""
    SILENCE = C_SOURCE_SILENCE
    PLAYER = C_SOURCE_PLAYER
    ECHO = C_SOURCE_ECHO
    NONE = C_SOURCE_NONE
    MIXER = C_SOURCE_MIXER


MODE_IDLE, MODE_RELAY, MODE_TERMINATE = Mode
LAW_ULAW, LAW_ALAW = Law
SOURCE_SILENCE, SOURCE_PLAYER, SOURCE_ECHO, SOURCE_NONE, SOURCE_MIXER = Source

# Receive scratch space shared by every stream: the reactor is single-threaded.
cdef uint8_t rx_bufs[BATCH][MAXPKT]
cdef iovec rx_iov[BATCH]
cdef mmsghdr rx_msgs[BATCH]
cdef sockaddr_storage rx_addrs[BATCH]
cdef uint8_t rx_ctrl[BATCH][CTRL]
cdef mmsghdr tx_msgs[BATCH]
cdef iovec tx_iov[BATCH]
cdef uint8_t tx_frame[12 + MAXPKT]

cdef const char* DTMF_CHARS = b"0123456789*#ABCD"


cdef void init_rx_headers() noexcept:
    cdef int i
    for i in range(BATCH):
        rx_iov[i].iov_base = rx_bufs[i]
        rx_iov[i].iov_len = MAXPKT
        memset(&rx_msgs[i].msg_hdr, 0, sizeof(msghdr))
        rx_msgs[i].msg_hdr.msg_iov = &rx_iov[i]
        rx_msgs[i].msg_hdr.msg_iovlen = 1
        rx_msgs[i].msg_hdr.msg_name = &rx_addrs[i]
        rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
        rx_msgs[i].msg_hdr.msg_control = rx_ctrl[i]
        rx_msgs[i].msg_hdr.msg_controllen = CTRL


cdef inline int64_t kernel_stamp(msghdr* h) noexcept nogil:
    """The kernel's receive time of a datagram (SO_TIMESTAMPNS, CLOCK_REALTIME ns), or
    -1 when it carries none (it arrived before the socket asked for stamps)."""
    cdef cmsghdr* c
    cdef timespec* ts
    if h.msg_controllen == 0:
        return -1
    c = CMSG_FIRSTHDR(h)
    while c != NULL:
        if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_TIMESTAMPNS:
            ts = <timespec*>CMSG_DATA(c)
            return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
        c = CMSG_NXTHDR(h, c)
    return -1


init_rx_headers()


# The media clock's sender thread. A tick encodes every channel's frame into a
# batch and hands it over; the thread sends it with no Python (and no GIL) in
# the way, so the event loop goes back to its other work (SIP, the control
# API) while the kernel delivers the frames. One batch is in flight at a time.
ctypedef struct tx_entry:
    int fd
    socklen_t addrlen
    int length
    ssize_t result
    sockaddr_storage addr
    uint8_t data[12 + FRAME]

ctypedef struct detect_entry:
    dtmf_state* dtmf    # the channel's detector (the channel is kept alive meanwhile)
    int nev
    int16_t pcm[FRAME]
    dtmf_event events[8]

ctypedef struct sender_state:
    pthread_mutex_t mu
    pthread_cond_t work
    pthread_cond_t done
    bint pending        # a batch is handed over and not yet sent
    bint stop
    int n
    tx_entry* entries
    int n_detect        # in-band DTMF detection of the same tick, after the sends
    detect_entry* detects


cdef void* sender_main(void* arg) noexcept nogil:
    cdef sender_state* st = <sender_state*>arg
    cdef tx_entry* e
    cdef int i, n
    while True:
        pthread_mutex_lock(&st.mu)
        while not st.pending and not st.stop:
            pthread_cond_wait(&st.work, &st.mu)
        if not st.pending:
            pthread_mutex_unlock(&st.mu)
            return NULL
        n = st.n
        pthread_mutex_unlock(&st.mu)
        # Linux has no send call that spans sockets (sendmmsg is one socket's
        # batch, and every channel has its own): one sendto per channel, here.
        for i in range(n):
            e = &st.entries[i]
            e.result = sendto(e.fd, e.data, e.length, MSG_DONTWAIT, <sockaddr*>&e.addr,
                              e.addrlen)
        # In-band DTMF (ITU-T Q.24) is the tick's costliest work per channel: it runs
        # here too, and its digits are reported with the next tick.
        for i in range(st.n_detect):
            st.detects[i].nev = dtmf_process(st.detects[i].dtmf, st.detects[i].pcm, FRAME,
                                             st.detects[i].events, 8)
        pthread_mutex_lock(&st.mu)
        st.pending = False
        pthread_cond_broadcast(&st.done)
        pthread_mutex_unlock(&st.mu)


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void put_header(uint8_t* p, uint8_t b1, uint16_t seq, uint32_t ts,
                            uint32_t ssrc) noexcept nogil:
    """The RTP fixed header (RFC 3550 5.1), version 2, no padding/extension/CSRC."""
    p[0] = 0x80
    p[1] = b1
    p[2] = seq >> 8
    p[3] = seq & 0xFF
    p[4] = ts >> 24
    p[5] = (ts >> 16) & 0xFF
    p[6] = (ts >> 8) & 0xFF
    p[7] = ts & 0xFF
    p[8] = ssrc >> 24
    p[9] = (ssrc >> 16) & 0xFF
    p[10] = (ssrc >> 8) & 0xFF
    p[11] = ssrc & 0xFF


cdef inline bint same_addr(const sockaddr_storage* a, const sockaddr_storage* b) noexcept nogil:
    cdef const sockaddr_in* a4
    cdef const sockaddr_in* b4
    cdef const sockaddr_in6* a6
    cdef const sockaddr_in6* b6
    if a.ss_family != b.ss_family:
        return False
    if a.ss_family == AF_INET:
        a4 = <const sockaddr_in*>a
        b4 = <const sockaddr_in*>b
        return a4.sin_port == b4.sin_port and a4.sin_addr.s_addr == b4.sin_addr.s_addr
    a6 = <const sockaddr_in6*>a
    b6 = <const sockaddr_in6*>b
    return a6.sin6_port == b6.sin6_port and memcmp(&a6.sin6_addr, &b6.sin6_addr, 16) == 0


cdef inline socklen_t addr_len(const sockaddr_storage* a) noexcept nogil:
    return sizeof(sockaddr_in) if a.ss_family == AF_INET else sizeof(sockaddr_in6)


cdef int to_sockaddr(str host, int port, sockaddr_storage* out) except -1:
    cdef sockaddr_in* a4 = <sockaddr_in*>out
    cdef sockaddr_in6* a6 = <sockaddr_in6*>out
    cdef bytes h = host.encode()
    memset(out, 0, sizeof(sockaddr_storage))
    if inet_pton(AF_INET, h, &a4.sin_addr) == 1:
        a4.sin_family = AF_INET
        a4.sin_port = htons(port)
        return 0
    if inet_pton(AF_INET6, h, &a6.sin6_addr) == 1:
        a6.sin6_family = AF_INET6
        a6.sin6_port = htons(port)
        return 0
    raise ValueError(f"not an IP address: {host!r}")


cdef tuple from_sockaddr(const sockaddr_storage* a):
    cdef const sockaddr_in* a4
    cdef const sockaddr_in6* a6
    if a.ss_family == AF_INET:
        a4 = <const sockaddr_in*>a
        return (_socket.inet_ntop(_socket.AF_INET, PyBytes_FromStringAndSize(<char*>&a4.sin_addr, 4)),
                ntohs(a4.sin_port))
    if a.ss_family == AF_INET6:
        a6 = <const sockaddr_in6*>a
        return (_socket.inet_ntop(_socket.AF_INET6, PyBytes_FromStringAndSize(<char*>&a6.sin6_addr, 16)),
                ntohs(a6.sin6_port))
    return None


def drain_socket(int fd):
    """Throw away every datagram queued on `fd` (a reused port's leftovers); returns the count.
    The GIL stays held: a non-blocking read never waits, and letting go of it here, at
    every call set-up, would hand it to another thread and make the loop wait for it."""
    cdef int n = 0
    while recvfrom(fd, tx_frame, MAXPKT, MSG_DONTWAIT, NULL, NULL) >= 0:
        n += 1
    return n


# -- SIP datagrams in batches ----------------------------------------------------------
# The SIP/UDP socket is read with recvmmsg and its answers go out with sendmmsg
# (engine/sip/transport.py): under load the kernel queue holds many datagrams, and one
# system call and one loop callback then serve them all.
cdef enum:
    SIP_BATCH = 64
    SIP_SLOT = 65536          # a UDP datagram's largest payload fits
cdef uint8_t* sip_rx_buf = NULL
cdef mmsghdr sip_rx_msgs[SIP_BATCH]
cdef iovec sip_rx_iov[SIP_BATCH]
cdef sockaddr_storage sip_rx_addr[SIP_BATCH]
cdef mmsghdr sip_tx_msgs[SIP_BATCH]
cdef iovec sip_tx_iov[SIP_BATCH]
cdef sockaddr_storage sip_tx_addr[SIP_BATCH]
cdef dict sip_peers = {}      # (IPv4 << 16 | port) -> (host, port): one tuple per peer


def recv_datagrams(int fd, int limit=SIP_BATCH):
    """The datagrams waiting on the non-blocking UDP socket `fd`, at most `limit` (64),
    read with one recvmmsg: a list of (payload bytes, (host, port)); [] when none wait."""
    global sip_rx_buf
    cdef int i, n
    cdef const sockaddr_in* a4
    cdef uint64_t key
    if limit > SIP_BATCH:
        limit = SIP_BATCH
    if sip_rx_buf == NULL:
        sip_rx_buf = <uint8_t*>malloc(SIP_BATCH * SIP_SLOT)
        if sip_rx_buf == NULL:
            raise MemoryError()
        for i in range(SIP_BATCH):
            sip_rx_iov[i].iov_base = sip_rx_buf + i * SIP_SLOT
            sip_rx_iov[i].iov_len = SIP_SLOT
            memset(&sip_rx_msgs[i], 0, sizeof(mmsghdr))
            sip_rx_msgs[i].msg_hdr.msg_iov = &sip_rx_iov[i]
            sip_rx_msgs[i].msg_hdr.msg_iovlen = 1
            sip_rx_msgs[i].msg_hdr.msg_name = &sip_rx_addr[i]
    for i in range(limit):
        sip_rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
    n = recvmmsg(fd, sip_rx_msgs, limit, MSG_DONTWAIT, NULL)
    if n < 0:
        if errno == EAGAIN or errno == EINTR:
            return []
        raise OSError(errno, os.strerror(errno))
    out = []
    for i in range(n):
        payload = PyBytes_FromStringAndSize(<char*>sip_rx_iov[i].iov_base, sip_rx_msgs[i].msg_len)
        if sip_rx_addr[i].ss_family == AF_INET:
            a4 = <const sockaddr_in*>&sip_rx_addr[i]
            key = (<uint64_t>ntohl(a4.sin_addr.s_addr) << 16) | ntohs(a4.sin_port)
            peer = sip_peers.get(key)
            if peer is None:
                if len(sip_peers) >= 65536:
                    sip_peers.clear()
                peer = sip_peers[key] = from_sockaddr(&sip_rx_addr[i])
        else:
            peer = from_sockaddr(&sip_rx_addr[i])
        out.append((payload, peer))
    return out


def send_datagrams(int fd, list items, int start=0):
    """Send `items[start:]`, (payload bytes, (host, port)) each, from the UDP socket `fd`
    with sendmmsg, 64 at a time. Returns the index of the first item not sent (len(items):
    all went); the caller sends that one on its own to learn why."""
    cdef int i, k, n, count
    cdef int total = len(items)
    cdef bytes payload
    while start < total:
        count = total - start
        if count > SIP_BATCH:
            count = SIP_BATCH
        for k in range(count):
            payload, addr = items[start + k]
            try:
                to_sockaddr(addr[0], addr[1], &sip_tx_addr[k])
            except (ValueError, TypeError, IndexError, OverflowError):
                count = k     # a name, not an address: the caller sends it on its own
                break
            sip_tx_iov[k].iov_base = <char*>payload
            sip_tx_iov[k].iov_len = len(payload)
            memset(&sip_tx_msgs[k], 0, sizeof(mmsghdr))
            sip_tx_msgs[k].msg_hdr.msg_iov = &sip_tx_iov[k]
            sip_tx_msgs[k].msg_hdr.msg_iovlen = 1
            sip_tx_msgs[k].msg_hdr.msg_name = &sip_tx_addr[k]
            sip_tx_msgs[k].msg_hdr.msg_namelen = addr_len(&sip_tx_addr[k])
        if count == 0:
            return start
        n = sendmmsg(fd, sip_tx_msgs, count, MSG_DONTWAIT)
        if n <= 0:
            return start
        start += n
        if n < count:
            return start
    return start


@cython.final
cdef class RtpStream:
    """One leg's RTP socket: receive statistics, transmit continuity, a payload FIFO.

    Invariant: `tx_ssrc` never changes, and every packet this stream sends
    (relayed or generated) has a sequence number one above the last one and
    a timestamp that advanced by the elapsed media time.
    """
    cdef readonly int fd
    cdef object sock               # keeps the socket (and so `fd`) alive
    cdef sockaddr_storage remote
    cdef readonly bint has_remote
    cdef readonly bint latched
    cdef public bint symmetric
    cdef readonly bint wait_latch  # send nothing until the far end has sent to us
    cdef stream_mode _mode
    cdef RtpStream peer
    cdef RtpHub hub
    # transmit side
    cdef readonly uint32_t tx_ssrc
    cdef readonly uint16_t tx_seq
    cdef readonly uint32_t tx_ts
    cdef int64_t tx_last_ns
    cdef bint resync
    cdef uint16_t seq_off
    cdef uint32_t ts_off
    cdef public int payload_type
    cdef public int dtmf_pt
    cdef stream_law _law
    # receive side (RFC 3550 A.1, A.8)
    cdef readonly uint64_t rx_packets
    cdef readonly uint64_t rx_bytes
    cdef readonly uint64_t tx_packets
    cdef readonly uint64_t tx_bytes
    cdef readonly uint64_t tx_dropped
    cdef readonly uint64_t rx_trimmed
    cdef readonly uint64_t rx_underruns    # a tick found no frame queued, and audio came after
    cdef bint rx_starved
    cdef public int playout        # frames a receiver queues before it plays (jitter buffer)
    cdef bint priming              # waiting for `playout` + 1 frames before playing again
    cdef readonly uint64_t rx_foreign
    cdef readonly uint64_t rx_invalid
    cdef readonly int64_t last_rx_ns
    cdef readonly uint64_t rx_duplicate    # the highest sequence number seen again
    cdef readonly uint64_t rx_reordered    # arrived after a later sequence number
    cdef readonly uint32_t rx_ssrc
    cdef bint seq_init
    cdef uint16_t max_seq
    cdef uint32_t cycles
    cdef uint32_t base_seq
    cdef int64_t transit
    cdef readonly double jitter
    cdef readonly bint kernel_ts   # jitter from the kernel's receive times (SO_TIMESTAMPNS)
    # queued G.711 payload for the clock
    cdef uint8_t fifo[FIFO]
    cdef int fifo_head
    cdef int fifo_len
    cdef stream_law fifo_law
    # RFC 4733 receive state
    cdef uint32_t ev_ts
    cdef bint ev_seen
    cdef bint ev_ended
    cdef int ev_code
    cdef list events

    def __cinit__(self):
        self.fd = -1

    def __init__(self, sock, int payload_type=0, int dtmf_pt=-1, bint symmetric=True):
        self.sock = sock
        self.fd = sock.fileno()
        self.payload_type = payload_type
        self._law = C_LAW_ALAW if payload_type == 8 else C_LAW_ULAW
        self.dtmf_pt = dtmf_pt
        self.symmetric = symmetric
        self._mode = C_MODE_IDLE
        r = os.urandom(10)
        self.tx_ssrc = int.from_bytes(r[0:4], "big")
        self.tx_seq = int.from_bytes(r[4:6], "big") & 0x7FFF
        self.tx_ts = int.from_bytes(r[6:10], "big") & 0x7FFFFFFF
        self.resync = True
        self.priming = True
        self.events = []

    # -- configuration ---------------------------------------------------------
    def set_remote(self, str host, int port, bint wait=False):
        """The address from SDP; symmetric RTP may later latch to the real source.

        With `wait`, nothing is sent until a packet has come from the far end, and
        then only to where it came from (RFC 4961): an SDP address alone cannot aim
        this stream's media at a third party."""
        self.wait_latch = wait
        if port == 0 or host in ("0.0.0.0", "::"):
            self.has_remote = False  # RFC 3264 8.4 hold: send nothing
            return
        to_sockaddr(host, port, &self.remote)
        self.has_remote = True
        self.latched = False

    def use_kernel_timestamps(self):
        """Time arrivals for the RFC 3550 jitter by the kernel's receive stamp
        (SO_TIMESTAMPNS) rather than by when the reactor read the packet: a busy
        reactor then adds nothing to the jitter it reports. Call before the first
        packet (one clock per stream). False when the kernel refuses."""
        cdef int on = 1
        if setsockopt(self.fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof(on)) != 0:
            return False
        self.kernel_ts = True
        return True

    @property
    def mode(self):
        """A `Mode`: set by relay_to(), terminate() and idle()."""
        return Mode(self._mode)

    @property
    def law(self):
        """The `Law` this stream sends."""
        return Law(self._law)

    @law.setter
    def law(self, value):
        self._law = Law(value)    # ValueError for anything but a Law

    @property
    def sending(self):
        """True when this stream sends to its remote address now."""
        return self.can_send()

    cdef inline bint can_send(self) noexcept nogil:
        return self.has_remote and (self.latched or not self.wait_latch)

    @property
    def remote_addr(self):
        return from_sockaddr(&self.remote) if self.has_remote else None

    def relay_to(self, RtpStream peer):
        """Forward everything received here out of `peer`'s socket."""
        if peer is self:
            raise ValueError("a stream cannot relay to itself")
        self.peer = peer
        self._mode = C_MODE_RELAY
        peer.resync = True

    def terminate(self):
        """Keep received audio for the media clock; transmissions come from the clock."""
        self.peer = None
        self._mode = C_MODE_TERMINATE
        self.resync = True

    def idle(self):
        self.peer = None
        self._mode = C_MODE_IDLE

    def take_events(self):
        """RFC 4733 events received since the last call: [(digit, duration_samples)]."""
        ev = self.events
        self.events = []
        return ev

    def stats(self):
        cdef uint32_t extended = self.cycles + self.max_seq
        cdef int64_t expected = (<int64_t>extended - self.base_seq + 1) if self.seq_init else 0
        lost = expected - <int64_t>self.rx_packets if expected > 0 else 0
        return {"rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
                "rx_foreign": self.rx_foreign, "rx_invalid": self.rx_invalid,
                "tx_dropped": self.tx_dropped, "duplicate": self.rx_duplicate,
                "underruns": self.rx_underruns, "trimmed": self.rx_trimmed,
                "reordered": self.rx_reordered,
                "expected": expected, "lost": max(lost, 0), "jitter_ms": self.jitter / 8.0,
                "ext_seq": extended, "rx_ssrc": self.rx_ssrc if self.seq_init else None,
                "ssrc": self.tx_ssrc, "seq": self.tx_seq, "ts": self.tx_ts}

    def fifo_frames(self):
        return self.fifo_len // FRAME

    # -- receive ---------------------------------------------------------------
    cdef inline bint accept_source(self, sockaddr_storage* src) noexcept nogil:
        # Symmetric RTP (RFC 4961): latch to where the far end really sends from.
        if self.latched:
            return same_addr(src, &self.remote)
        if self.symmetric:
            memcpy(&self.remote, src, sizeof(sockaddr_storage))
            self.has_remote = True
            self.latched = True
            return True
        if not self.has_remote:
            return True
        if same_addr(src, &self.remote):
            self.latched = True
            return True
        return False

    cdef inline void rx_stats(self, const uint8_t* p, int64_t now) noexcept nogil:
        cdef uint16_t seq = (p[2] << 8) | p[3]
        cdef uint32_t ts = (<uint32_t>p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7]
        cdef uint32_t ssrc = (<uint32_t>p[8] << 24) | (p[9] << 16) | (p[10] << 8) | p[11]
        cdef int64_t arrival
        cdef int64_t transit
        cdef int64_t d
        if not self.seq_init or ssrc != self.rx_ssrc:
            self.seq_init = True
            self.rx_ssrc = ssrc
            self.base_seq = seq
            self.max_seq = seq
            self.cycles = 0
            self.transit = 0
        elif seq == self.max_seq:
            self.rx_duplicate += 1
        elif <uint16_t>(seq - self.max_seq) < 0x8000:
            if seq < self.max_seq:
                self.cycles += 0x10000  # RFC 3550 A.1: sequence number wrapped
            self.max_seq = seq
        else:
            self.rx_reordered += 1
        if now < 0:
            return      # no receive time on one clock with the others: no jitter sample
        # RFC 3550 A.8 interarrival jitter, in timestamp units.
        arrival = (now // 125000)
        transit = arrival - ts
        if self.transit != 0:
            d = transit - self.transit
            if d < 0:
                d = -d
            self.jitter += (d - self.jitter) / 16.0
        self.transit = transit

    cdef int drain(self) except -1:
        cdef int n, i, out, hlen, plen, cc
        cdef uint8_t* p
        cdef RtpStream peer
        cdef int64_t now
        cdef unsigned int got = 0
        cdef int batches = 0
        cdef int sent
        while True:
            with nogil:
                n = recvmmsg(self.fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL)
            if n <= 0:
                return got
            got += n
            batches += 1
            now = now_ns()
            peer = self.peer if self._mode == C_MODE_RELAY else None
            out = 0
            for i in range(n):
                p = rx_bufs[i]
                plen = rx_msgs[i].msg_len
                # RFC 3550 5.1: version 2, at least the fixed header.
                if plen < 12 or (p[0] >> 6) != 2:
                    self.rx_invalid += 1
                    continue
                if not self.accept_source(&rx_addrs[i]):
                    self.rx_foreign += 1
                    continue
                self.rx_packets += 1
                self.rx_bytes += plen
                self.last_rx_ns = now
                self.rx_stats(p, kernel_stamp(&rx_msgs[i].msg_hdr) if self.kernel_ts
                              else now)
                if peer is not None:
                    if peer.can_send():
                        peer.rewrite(p, now)
                        tx_iov[out].iov_base = p
                        tx_iov[out].iov_len = plen
                        memset(&tx_msgs[out].msg_hdr, 0, sizeof(msghdr))
                        tx_msgs[out].msg_hdr.msg_iov = &tx_iov[out]
                        tx_msgs[out].msg_hdr.msg_iovlen = 1
                        tx_msgs[out].msg_hdr.msg_name = &peer.remote
                        tx_msgs[out].msg_hdr.msg_namelen = addr_len(&peer.remote)
                        out += 1
                elif self._mode == C_MODE_TERMINATE:
                    cc = p[0] & 0x0F
                    hlen = 12 + 4 * cc
                    if p[0] & 0x10:  # header extension (RFC 3550 5.3.1)
                        if plen < hlen + 4:
                            continue
                        hlen += 4 + 4 * ((p[hlen + 2] << 8) | p[hlen + 3])
                    if p[0] & 0x20 and plen > hlen:  # padding
                        plen -= p[plen - 1]
                    if plen <= hlen:
                        continue
                    self.on_payload(p, p + hlen, plen - hlen)
            for i in range(n):
                # recvmmsg rewrote the address and control lengths: set them back.
                rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                rx_msgs[i].msg_hdr.msg_controllen = CTRL
            if out:
                sent = 0
                while sent < out:
                    with nogil:
                        i = sendmmsg(peer.fd, &tx_msgs[sent], out - sent, MSG_DONTWAIT)
                    if i <= 0:
                        break
                    sent += i
                peer.tx_packets += sent
                for i in range(sent):
                    peer.tx_bytes += tx_msgs[i].msg_len
                # A full socket buffer drops what is left; count it, never block.
                peer.tx_dropped += out - sent
            # Level-triggered epoll brings us back: a flood on one socket must not
            # keep the loop from SIP, timers and the media clock.
            if n < BATCH or batches >= MAX_BATCHES:
                return got

    cdef inline void rewrite(self, uint8_t* p, int64_t now) noexcept:
        """Map a relayed packet onto this stream's SSRC, sequence and timeline."""
        cdef uint16_t seq = (p[2] << 8) | p[3]
        cdef uint32_t ts = (<uint32_t>p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7]
        cdef int64_t elapsed
        cdef uint8_t b0
        if self.resync:
            # The source changed: continue our numbering, advance time by the gap.
            elapsed = (now - self.tx_last_ns) // 125000 if self.tx_last_ns else FRAME
            if elapsed < FRAME:
                elapsed = FRAME
            elif elapsed > 8000 * 60:
                elapsed = 8000 * 60
            self.seq_off = <uint16_t>(self.tx_seq + 1 - seq)
            self.ts_off = <uint32_t>(self.tx_ts + <uint32_t>elapsed - ts)
            self.resync = False
            p[1] |= 0x80  # marker: a new talkspurt for the far end's jitter buffer
        seq = <uint16_t>(seq + self.seq_off)
        ts = <uint32_t>(ts + self.ts_off)
        b0 = p[0]  # a relayed packet keeps its own padding, extension and CSRC bits
        put_header(p, p[1], seq, ts, self.tx_ssrc)
        p[0] = b0
        self.tx_seq = seq
        self.tx_ts = ts
        self.tx_last_ns = now

    cdef void on_payload(self, const uint8_t* hdr, const uint8_t* data, int n) noexcept:
        cdef int pt = hdr[1] & 0x7F
        cdef int room, first, tail
        cdef uint32_t ts
        if pt == self.dtmf_pt:
            if n >= 4:
                ts = (<uint32_t>hdr[4] << 24) | (hdr[5] << 16) | (hdr[6] << 8) | hdr[7]
                self.on_event(ts, data[0], (data[1] & 0x80) != 0, (data[2] << 8) | data[3])
            return
        if pt != 0 and pt != 8:
            return
        self.fifo_law = C_LAW_ALAW if pt == 8 else C_LAW_ULAW
        if self.rx_starved:
            # The clock heard silence where this audio belonged: a 20 ms slip mid-stream
            # (a gap only the end of the stream follows is not one).
            self.rx_underruns += 1
            self.rx_starved = False
        if n > FIFO:
            data += n - FIFO
            n = FIFO
        # Bounded latency: when the queue would overflow, the oldest audio goes.
        room = FIFO - self.fifo_len
        if n > room:
            self.fifo_head = (self.fifo_head + (n - room)) % FIFO
            self.fifo_len -= n - room
        tail = (self.fifo_head + self.fifo_len) % FIFO
        first = FIFO - tail
        if first >= n:
            memcpy(&self.fifo[tail], data, n)
        else:
            memcpy(&self.fifo[tail], data, first)
            memcpy(&self.fifo[0], data + first, n - first)
        self.fifo_len += n

    cdef void on_event(self, uint32_t ts, int code, bint end, int duration) noexcept:
        # RFC 4733 2.5.1: one event per timestamp; the end bit may be sent three times.
        if not self.ev_seen or ts != self.ev_ts:
            if self.ev_seen and not self.ev_ended and self.ev_code < 16:
                self.events.append((chr(DTMF_CHARS[self.ev_code]), -1))
            self.ev_seen = True
            self.ev_ts = ts
            self.ev_ended = False
            self.ev_code = code
        if end and not self.ev_ended:
            self.ev_ended = True
            if code < 16:
                self.events.append((chr(DTMF_CHARS[code]), duration))

    cdef int pull(self, int16_t* pcm) noexcept nogil:
        """One frame of received audio as PCM; silence when nothing arrived."""
        cdef uint8_t frame[FRAME]
        cdef int n = FRAME, first
        if self.priming and self.fifo_len < (self.playout + 1) * FRAME:
            # Filling the jitter buffer: the silence is the buffer's delay, not a slip.
            memset(pcm, 0, FRAME * sizeof(int16_t))
            return 0
        self.priming = False
        if self.fifo_len < FRAME:
            memset(pcm, 0, FRAME * sizeof(int16_t))
            if self.rx_packets:
                self.rx_starved = True
                self.priming = self.playout > 0
            return 0
        first = FIFO - self.fifo_head
        if first >= n:
            memcpy(frame, &self.fifo[self.fifo_head], n)
        else:
            memcpy(frame, &self.fifo[self.fifo_head], first)
            memcpy(frame + first, &self.fifo[0], n - first)
        self.fifo_head = (self.fifo_head + n) % FIFO
        self.fifo_len -= n
        if self.fifo_len > (2 + self.playout) * FRAME:
            # More than two frames still queued: the far end's clock runs ahead of
            # ours (or a burst arrived). Drop one so the delay shrinks back
            # instead of only ever growing.
            self.fifo_head = (self.fifo_head + FRAME) % FIFO
            self.fifo_len -= FRAME
            self.rx_trimmed += 1
        if self.fifo_law == C_LAW_ALAW:
            alaw_decode_buffer(frame, pcm, FRAME)
        else:
            ulaw_decode_buffer(frame, pcm, FRAME)
        return 1

    cdef int frame_pcm(self, const int16_t* pcm, int64_t now, uint8_t* p) noexcept nogil:
        """Encode one frame into `p` (12 + FRAME octets) with the next sequence number
        and timestamp; 0 when this stream sends nothing."""
        cdef int64_t elapsed
        cdef uint32_t step = FRAME
        cdef uint8_t marker = 0
        if not self.can_send():
            return 0
        if self.resync:
            if self.tx_last_ns:
                elapsed = (now - self.tx_last_ns) // 125000
                if elapsed > FRAME:
                    step = <uint32_t>(elapsed if elapsed < 8000 * 60 else 8000 * 60)
            marker = 0x80
            self.resync = False
        self.tx_seq = <uint16_t>(self.tx_seq + 1)
        self.tx_ts = self.tx_ts + step
        self.tx_last_ns = now
        put_header(p, marker | (self.payload_type & 0x7F), self.tx_seq, self.tx_ts, self.tx_ssrc)
        if self._law == C_LAW_ALAW:
            alaw_encode_buffer(pcm, p + 12, FRAME)
        else:
            ulaw_encode_buffer(pcm, p + 12, FRAME)
        return 1

    cdef int send_pcm(self, const int16_t* pcm, int64_t now) noexcept nogil:
        """Encode one frame and send it now (the clock without a sender thread)."""
        if not self.frame_pcm(pcm, now, tx_frame):
            return 0
        if sendto(self.fd, tx_frame, 12 + FRAME, MSG_DONTWAIT, <sockaddr*>&self.remote,
                  addr_len(&self.remote)) > 0:
            self.tx_packets += 1
            self.tx_bytes += 12 + FRAME
        return 1

    cdef int stage_pcm(self, const int16_t* pcm, int64_t now, tx_entry* e) noexcept nogil:
        """Encode one frame into a sender batch entry (sent by the sender thread)."""
        if not self.frame_pcm(pcm, now, e.data):
            return 0
        e.fd = self.fd
        e.addr = self.remote
        e.addrlen = addr_len(&self.remote)
        e.length = 12 + FRAME
        e.result = -1
        return 1

    def send_event(self, int code, int duration, bint end, bint first, int volume=10):
        """Send one RFC 4733 event packet (the caller paces and repeats the end)."""
        cdef uint8_t* p = tx_frame
        cdef int64_t now = now_ns()
        if not self.can_send() or self.dtmf_pt < 0:
            return False
        self.tx_seq = <uint16_t>(self.tx_seq + 1)
        if first:
            self.tx_ts = self.tx_ts + FRAME
        self.tx_last_ns = now
        put_header(p, (0x80 if first else 0) | (self.dtmf_pt & 0x7F), self.tx_seq, self.tx_ts,
                   self.tx_ssrc)
        p[12] = code
        p[13] = (0x80 if end else 0) | (volume & 0x3F)
        p[14] = (duration >> 8) & 0xFF
        p[15] = duration & 0xFF
        sendto(self.fd, p, 16, MSG_DONTWAIT, <sockaddr*>&self.remote, addr_len(&self.remote))
        self.tx_packets += 1
        return True


@cython.final
cdef class RtpHub:
    """One epoll set for every RTP socket; the event loop watches `fd` alone."""
    cdef readonly int fd
    cdef dict streams        # fd -> RtpStream, keeps them alive while registered
    cdef epoll_event events[MAXEVENTS]
    cdef readonly uint64_t wakeups

    def __cinit__(self):
        self.fd = epoll_create1(EPOLL_CLOEXEC)
        if self.fd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.streams = {}

    def add(self, RtpStream s):
        cdef epoll_event ev
        if s.fd in self.streams:
            return
        ev.events = EPOLLIN
        ev.data.fd = s.fd
        if epoll_ctl(self.fd, EPOLL_CTL_ADD, s.fd, &ev) != 0:
            raise OSError(errno, f"epoll_ctl ADD fd {s.fd} failed")
        self.streams[s.fd] = s
        s.hub = self

    def remove(self, RtpStream s):
        cdef epoll_event ev
        if self.streams.pop(s.fd, None) is not None:
            epoll_ctl(self.fd, EPOLL_CTL_DEL, s.fd, &ev)
            s.hub = None
            s._mode = C_MODE_IDLE
            s.peer = None

    def __len__(self):
        return len(self.streams)

    def poll(self):
        """Drain every ready socket (called by the loop when `fd` is readable)."""
        cdef int n, i
        cdef RtpStream s
        self.wakeups += 1
        n = epoll_wait(self.fd, self.events, MAXEVENTS, 0)
        for i in range(n):
            s = self.streams.get(self.events[i].data.fd)
            if s is not None:
                s.drain()

    def close(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        self.streams.clear()


@cython.final
cdef class Player:
    """16-bit 8 kHz PCM played frame by frame, `loops` times (0: forever)."""
    cdef const int16_t[::1] pcm
    cdef Py_ssize_t pos
    cdef public int loops
    cdef readonly bint done

    def __init__(self, const int16_t[::1] pcm, int loops=1):
        self.pcm = pcm
        self.pos = 0
        self.loops = loops
        self.done = pcm.shape[0] == 0

    cdef void fill(self, int16_t* out) noexcept nogil:
        cdef Py_ssize_t n = self.pcm.shape[0], take, filled = 0
        while filled < FRAME:
            if self.done:
                memset(out + filled, 0, (FRAME - filled) * sizeof(int16_t))
                return
            take = min(FRAME - filled, n - self.pos)
            memcpy(out + filled, &self.pcm[self.pos], take * sizeof(int16_t))
            filled += take
            self.pos += take
            if self.pos >= n:
                self.pos = 0
                if self.loops > 0:
                    self.loops -= 1
                    if self.loops == 0:
                        self.done = True


@cython.final
cdef class Recorder:
    """Received audio appended into a preallocated PCM buffer (max length), with
    a silence detector: after `silence_frames` quiet frames that follow some
    sound, the clock reports `record-silence` once."""
    cdef int16_t[::1] buf
    cdef readonly Py_ssize_t length
    cdef readonly bint full
    cdef public int silence_threshold     # mean absolute amplitude below which a frame is quiet
    cdef public int silence_frames        # 0: no silence detection
    cdef int quiet_run
    cdef readonly bint heard
    cdef readonly bint silence_reported

    def __init__(self, int16_t[::1] buf, int silence_frames=0, int silence_threshold=200):
        self.buf = buf
        self.length = 0
        self.full = buf.shape[0] == 0
        self.silence_frames = silence_frames
        self.silence_threshold = silence_threshold

    cdef void put(self, const int16_t* pcm) noexcept nogil:
        cdef Py_ssize_t room = self.buf.shape[0] - self.length
        cdef Py_ssize_t n = FRAME if FRAME < room else room
        cdef int64_t total = 0
        cdef int i
        if n > 0:
            memcpy(&self.buf[self.length], pcm, n * sizeof(int16_t))
            self.length += n
        if self.length >= self.buf.shape[0]:
            self.full = True
        if self.silence_frames > 0:
            for i in range(FRAME):
                total += pcm[i] if pcm[i] >= 0 else -pcm[i]
            if total < <int64_t>self.silence_threshold * FRAME:
                self.quiet_run += 1
            else:
                self.quiet_run = 0
                self.heard = True

    cdef bint silence_due(self) noexcept nogil:
        if self.silence_frames > 0 and self.heard and not self.silence_reported and \
                self.quiet_run >= self.silence_frames:
            self.silence_reported = True
            return True
        return False

    def samples(self):
        return self.buf[:self.length]


@cython.final
cdef class Channel:
    """A terminating leg on the media clock: what it hears and what it sends."""
    cdef readonly int id
    cdef readonly RtpStream stream
    cdef channel_source _source
    cdef public Player player
    cdef public Recorder recorder
    cdef readonly Conference conference
    cdef readonly int slot
    cdef int16_t rx_pcm[FRAME]
    cdef int16_t tx_pcm[FRAME]
    cdef bint heard
    cdef public bint receiving
    cdef dtmf_state* dtmf
    cdef dtmf_event dtmf_events[8]
    cdef object clock              # the MediaClock it is on (its sender may use `dtmf`)

    def __init__(self, int id, RtpStream stream):
        self.id = id
        self.stream = stream
        self._source = C_SOURCE_SILENCE
        self.receiving = True
        self.slot = -1

    def __dealloc__(self):
        if self.dtmf is not NULL:
            dtmf_free(self.dtmf)
            free(self.dtmf)
            self.dtmf = NULL

    @property
    def source(self):
        """The `Source` of what this channel sends on each tick."""
        return Source(self._source)

    @source.setter
    def source(self, value):
        self._source = Source(value)    # ValueError for anything but a Source

    def play(self, Player player):
        self.player = player
        self._source = C_SOURCE_PLAYER

    def echo(self):
        self.player = None
        self._source = C_SOURCE_ECHO

    def silence(self):
        self.player = None
        self._source = C_SOURCE_SILENCE

    def mute_output(self):
        """Send nothing (e.g. while the far end holds the call)."""
        self.player = None
        self._source = C_SOURCE_NONE

    def join(self, Conference conference, int slot):
        """Hear the conference mix (minus ourselves) and be heard in it."""
        self.conference = conference
        self.slot = slot
        self.player = None
        self._source = C_SOURCE_MIXER

    def leave(self):
        self.conference = None
        self.slot = -1
        if self._source == C_SOURCE_MIXER:
            self._source = C_SOURCE_SILENCE

    def detect_dtmf(self, bint on=True):
        """In-band DTMF detection (ITU-T Q.24) on what this channel hears."""
        if self.clock is not None and (on != (self.dtmf is not NULL)):
            self.clock.sync()    # the sender thread may be running this detector
        if on and self.dtmf is NULL:
            self.dtmf = <dtmf_state*>malloc(sizeof(dtmf_state))
            if self.dtmf is NULL or dtmf_init(self.dtmf, 8000) != 0:
                free(self.dtmf)
                self.dtmf = NULL
                raise MemoryError("cannot allocate a DTMF detector")
        elif not on and self.dtmf is not NULL:
            dtmf_free(self.dtmf)
            free(self.dtmf)
            self.dtmf = NULL

    @property
    def detecting(self):
        return self.dtmf is not NULL

    def last_rx(self):
        return [self.rx_pcm[i] for i in range(FRAME)]


@cython.final
cdef class MediaClock:
    """Every terminating channel, processed together once per 20 ms tick:
    receive (decode, record, detect, put into conferences), mix, send."""
    cdef dict channels
    cdef list order
    cdef dict conferences   # id(conference) -> [conference, members]
    cdef readonly uint64_t ticks
    cdef readonly uint64_t frames_sent
    cdef sender_state* sender    # NULL: each tick sends its frames itself
    cdef pthread_t sender_thread
    cdef int capacity            # entries allocated in sender.entries
    cdef list in_flight          # the RtpStream of each entry handed over (kept alive)
    cdef list detecting          # the Channel of each detection handed over (kept alive)
    cdef list held_events        # digits the sender detected, reported by the next tick
    cdef readonly uint64_t send_batches
    cdef public int send_thread_min   # fewer channels than this: the tick sends and detects itself

    def __cinit__(self):
        self.sender = NULL
        self.capacity = 0
        self.send_thread_min = 0
        self.in_flight = []
        self.detecting = []
        self.held_events = []

    def __init__(self, bint send_thread=False):
        """`send_thread`: send each tick's frames from a thread of the kernel's own
        (the tick returns once they are encoded) instead of on the caller's."""
        self.channels = {}
        self.order = []
        self.conferences = {}
        if send_thread and self.sender is NULL:
            self._start_sender()

    def __dealloc__(self):
        self._stop_sender()

    cdef int _start_sender(self) except -1:
        cdef sender_state* st = <sender_state*>malloc(sizeof(sender_state))
        if st is NULL:
            raise MemoryError()
        memset(st, 0, sizeof(sender_state))
        pthread_mutex_init(&st.mu, NULL)
        pthread_cond_init(&st.work, NULL)
        pthread_cond_init(&st.done, NULL)
        if pthread_create(&self.sender_thread, NULL, sender_main, st) != 0:
            pthread_cond_destroy(&st.done)
            pthread_cond_destroy(&st.work)
            pthread_mutex_destroy(&st.mu)
            free(st)
            raise OSError("media clock: the sender thread could not be started")
        self.sender = st
        return 0

    cdef void _stop_sender(self) noexcept:
        cdef sender_state* st = self.sender
        if st is NULL:
            return
        # The GIL stays held here and below: the sender never takes it, and giving it up
        # on the loop's thread would let another thread keep it for a switch interval.
        pthread_mutex_lock(&st.mu)
        st.stop = True
        pthread_cond_signal(&st.work)
        pthread_mutex_unlock(&st.mu)
        pthread_join(self.sender_thread, NULL)
        self._reap()
        self.sender = NULL
        pthread_cond_destroy(&st.done)
        pthread_cond_destroy(&st.work)
        pthread_mutex_destroy(&st.mu)
        free(st.entries)
        free(st.detects)
        free(st)
        self.capacity = 0

    cdef void _reap(self) noexcept:
        """Count what the last batch sent on each stream (the batch is done)."""
        cdef RtpStream s
        cdef Channel ch
        cdef tx_entry* e
        cdef detect_entry* d
        cdef Py_ssize_t i
        cdef int k
        if self.in_flight:
            for i in range(len(self.in_flight)):
                s = <RtpStream>self.in_flight[i]
                e = &self.sender.entries[i]
                if e.result > 0:
                    s.tx_packets += 1
                    s.tx_bytes += e.length
            self.in_flight = []
        if self.detecting:
            for i in range(len(self.detecting)):
                ch = <Channel>self.detecting[i]
                d = &self.sender.detects[i]
                for k in range(d.nev):
                    self.held_events.append((ch.id, "dtmf", chr(d.events[k].digit)))
            self.detecting = []
            self.sender.n_detect = 0

    cdef void _wait(self) noexcept:
        cdef sender_state* st = self.sender
        if st is NULL:
            return
        pthread_mutex_lock(&st.mu)
        while st.pending:
            pthread_cond_wait(&st.done, &st.mu)
        pthread_mutex_unlock(&st.mu)
        self._reap()

    @property
    def send_thread(self):
        """True while a sender thread sends the ticks' frames."""
        return self.sender is not NULL

    def sync(self):
        """Return once the last tick's frames are handed to the kernel (and counted
        in their streams' `tx_packets`). A no-op without a sender thread."""
        self._wait()

    def close(self):
        """Send what is in flight and stop the sender thread; later ticks send
        their frames themselves."""
        self._stop_sender()

    def add(self, Channel ch):
        if ch.id not in self.channels:
            self.channels[ch.id] = ch
            ch.clock = self
            self.order.append(ch)
            if ch.conference is not None:
                self._track(ch.conference, 1)

    def remove(self, Channel ch):
        # The caller may close the channel's socket next: no frame of it may still
        # be waiting for the sender thread (whose fd could then be reused).
        self._wait()
        if self.channels.pop(ch.id, None) is not None:
            ch.clock = None
            self.order.remove(ch)
            if ch.conference is not None:
                self._track(ch.conference, -1)

    def join(self, Channel ch, Conference conference, int slot):
        if ch.conference is not None:
            self.leave(ch)
        ch.join(conference, slot)
        if ch.id in self.channels:
            self._track(conference, 1)

    def leave(self, Channel ch):
        if ch.conference is not None:
            if ch.id in self.channels:
                self._track(ch.conference, -1)
            ch.leave()

    cdef _track(self, Conference conf, int delta):
        entry = self.conferences.get(id(conf))
        if entry is None:
            entry = self.conferences[id(conf)] = [conf, 0]
        entry[1] += delta
        if entry[1] <= 0:
            del self.conferences[id(conf)]

    def __len__(self):
        return len(self.order)

    def tick(self):
        """Run one frame for every channel. Returns [(channel_id, event, detail)] or None."""
        cdef Channel ch
        cdef RtpStream s
        cdef Conference conf
        cdef const int16_t* mixed
        cdef int64_t now = now_ns()
        cdef list events = None
        cdef int i, n
        cdef int staged = 0
        cdef sender_state* st = self.sender
        cdef tx_entry* grown
        cdef detect_entry* grown_d
        cdef int detects = 0
        self.ticks += 1
        if st is not NULL:
            self._wait()     # the last tick's batch (long gone at 20 ms a tick)
            if self.held_events:
                events = self.held_events
                self.held_events = []
        if st is not NULL and len(self.order) < self.send_thread_min:
            # A few channels cost the loop next to nothing, and frames sent from the tick
            # itself leave on its grid, without the thread's wake-up jitter.
            st = NULL
        if st is not NULL:
            if self.capacity < len(self.order):
                n = len(self.order) + 64
                grown = <tx_entry*>realloc(st.entries, n * sizeof(tx_entry))
                if grown is NULL:
                    raise MemoryError()
                st.entries = grown
                grown_d = <detect_entry*>realloc(st.detects, n * sizeof(detect_entry))
                if grown_d is NULL:
                    raise MemoryError()
                st.detects = grown_d
                self.capacity = n
        # 1. what everyone hears
        for ch in self.order:
            s = ch.stream
            if not ch.receiving:
                continue
            ch.heard = s.pull(ch.rx_pcm)
            if s.events:
                if events is None:
                    events = []
                for digit, duration in s.take_events():
                    events.append((ch.id, "dtmf", digit))
            if ch.dtmf is not NULL and st is not NULL:
                st.detects[detects].dtmf = ch.dtmf
                memcpy(st.detects[detects].pcm, ch.rx_pcm, sizeof(ch.rx_pcm))
                st.detects[detects].nev = 0
                self.detecting.append(ch)
                detects += 1
            elif ch.dtmf is not NULL:
                n = dtmf_process(ch.dtmf, ch.rx_pcm, FRAME, ch.dtmf_events, 8)
                for i in range(n):
                    if events is None:
                        events = []
                    events.append((ch.id, "dtmf", chr(ch.dtmf_events[i].digit)))
            if ch.recorder is not None and not ch.recorder.full:
                ch.recorder.put(ch.rx_pcm)
                if ch.recorder.full:
                    if events is None:
                        events = []
                    events.append((ch.id, "record-full", ch.recorder.length))
                elif ch.recorder.silence_due():
                    if events is None:
                        events = []
                    events.append((ch.id, "record-silence", ch.recorder.length))
            if ch.conference is not None and ch.heard:
                conf_put_pcm(ch.conference, ch.slot, ch.rx_pcm)
        # 2. every conference mixes once
        for entry in self.conferences.values():
            conf = entry[0]
            conf_mix(conf)
        # 3. what everyone is sent
        for ch in self.order:
            s = ch.stream
            if ch._source == C_SOURCE_SILENCE:
                memset(ch.tx_pcm, 0, sizeof(ch.tx_pcm))
            elif ch._source == C_SOURCE_ECHO:
                memcpy(ch.tx_pcm, ch.rx_pcm, sizeof(ch.tx_pcm))
            elif ch._source == C_SOURCE_PLAYER:
                ch.player.fill(ch.tx_pcm)
                if ch.player.done:
                    if events is None:
                        events = []
                    events.append((ch.id, "play-done", None))
                    ch.player = None
                    ch._source = C_SOURCE_SILENCE
            elif ch._source == C_SOURCE_MIXER:
                mixed = conf_out_pcm(ch.conference, ch.slot)
                if mixed is NULL:
                    memset(ch.tx_pcm, 0, sizeof(ch.tx_pcm))
                else:
                    memcpy(ch.tx_pcm, mixed, sizeof(ch.tx_pcm))
            else:
                continue
            if st is NULL:
                if s.send_pcm(ch.tx_pcm, now):
                    self.frames_sent += 1
            elif s.stage_pcm(ch.tx_pcm, now, &st.entries[staged]):
                self.in_flight.append(s)
                staged += 1
                self.frames_sent += 1
        if staged or detects:
            pthread_mutex_lock(&st.mu)
            st.n = staged
            st.n_detect = detects
            st.pending = True
            pthread_cond_signal(&st.work)
            pthread_mutex_unlock(&st.mu)
            self.send_batches += 1
        return events
