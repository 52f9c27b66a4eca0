/*
 * RTP load for many concurrent relayed calls: both legs of every call send one packet
 * per ptime, as G.711 phones do.
 *
 *   rtpload PORTS_FILE SECONDS [PTIME_MS]
 *
 * PORTS_FILE is what bench/relay_node.py --calls writes:
 *   {"host": "127.0.0.1", "calls": N, "pairs": [[A_1, B_1], ..., [A_N, B_N]]}
 * Only the numbers after "pairs" are read; the relay is on 127.0.0.1.
 *
 * Two UDP sockets stand for the two sides of every call.  The caller socket sends to
 * each A_i and the callee socket to each B_i, so by symmetric RTP A_i latches to the
 * caller socket and B_i to the callee socket, and the relay's output comes back here:
 *   flow 2i:   caller -> A_i, relayed out of B_i -> callee socket
 *   flow 2i+1: callee -> B_i, relayed out of A_i -> caller socket
 * A received packet's flow is found from its source port (the relay port that sent it).
 *
 * One latching packet goes to every relay port first (not counted), then every PTIME_MS
 * (default 20) on absolute deadlines (clock_nanosleep TIMER_ABSTIME) each flow gets one
 * 172-byte RTP packet (version 2, PT 0, per-flow SSRC, rising sequence number and
 * timestamp), in sendmmsg batches.  The payload carries a marker, the flow, the tick and
 * the send time; the relay rewrites the header only, so the payload is checked on arrival
 * (misrouted packets) and gives the one-way latency through the relay.  A second thread
 * receives on both sockets with recvmmsg and counts per flow: packets received, and gaps
 * in the RTP sequence numbers as the relay rewrote them.
 *
 * After SECONDS plus a 1 s drain, prints one JSON line on stdout:
 *   {"tool":"rtpload","calls":N,"flows":2N,"sent":S,"received":R,"lost":L,"loss_pct":P,
 *    "max_flow_lost":M,..., "late_ticks":T,"behind":false,...}
 * late_ticks counts ticks whose packets were not all sent before the next tick was due;
 * "behind" is true when that happened to more than 1 % of the ticks, i.e. the load tool,
 * not the relay, set the pace, and the run says nothing about the relay.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#define PKT_SIZE 172          /* 12-byte RTP header + 20 ms of G.711 */
#define BATCH 256             /* datagrams per sendmmsg/recvmmsg call (UIO_MAXIOV is 1024) */
#define SLOT 2048
#define MAX_CALLS 30000       /* 2 ports per call: the whole port range */
#define MAGIC 0x52544c44u     /* "RTLD" at the start of the payload */
#define WARMUP_TICK 0xffffffffu
#define LAT_BUCKET_NS 10000   /* latency histogram: 10 us buckets ... */
#define LAT_BUCKETS 20000     /* ... up to 200 ms, then one overflow bucket */
#define DRAIN_NS 1000000000LL

enum { CALLER = 0, CALLEE = 1 };

struct flow {
    struct sockaddr_in dst;   /* the relay port this flow is sent to */
    unsigned char pkt[PKT_SIZE];
    uint16_t seq;
    uint32_t stamp;
    long sent;
};

/* Receive side of a flow, owned by the receiver thread; kept apart from struct flow so
 * the two threads do not write to the same cache lines. */
struct flow_rx {
    long received;
    long gaps;
    long reordered;
    uint16_t last_seq;
    int have_seq;
};

static struct flow *flows;
static struct flow_rx *flows_rx;
static int nflows;
static int fds[2];
static int32_t port_flow[65536];      /* relay source port -> flow, -1 if none */
static atomic_int stop_rx;

/* Receiver totals, written by the receiver thread and read after it is joined. */
static long rx_warmup, rx_foreign, rx_misrouted, rx_malformed;
static long lat_hist[LAT_BUCKETS + 1];
static int64_t lat_max_ns;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec to_timespec(int64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    return ts;
}

static void sleep_until(int64_t deadline) {
    struct timespec ts = to_timespec(deadline);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void put32(unsigned char *p, uint32_t v) {
    v = htonl(v);
    memcpy(p, &v, 4);
}

static uint32_t get32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

/* The pairs from the ports file: every integer inside the list after the "pairs" key,
 * two per call. */
static int read_ports(const char *path, uint16_t **ports_out) {
    FILE *f = fopen(path, "r");
    if (!f) {
        perror("rtpload: ports file");
        return -1;
    }
    static char text[1 << 20];
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    if (len == sizeof text - 1) {
        fprintf(stderr, "rtpload: %s is larger than %zu bytes\n", path, sizeof text - 1);
        return -1;
    }
    text[len] = '\0';
    char *p = strstr(text, "\"pairs\"");
    if (!p) {
        fprintf(stderr, "rtpload: no \"pairs\" in %s\n", path);
        return -1;
    }
    p = strchr(p, '[');
    if (!p) {
        fprintf(stderr, "rtpload: no list after \"pairs\" in %s\n", path);
        return -1;
    }
    uint16_t *ports = malloc(sizeof(uint16_t) * 2 * MAX_CALLS);
    if (!ports) return -1;
    /* p is at the '[' that opens the list; stop at the ']' that closes it. */
    int n = 0, depth = 0;
    while (*p) {
        if (*p == '[' || *p == ']') {
            depth += *p == '[' ? 1 : -1;
            if (depth == 0) break;
            p++;
            continue;
        }
        if (*p < '0' || *p > '9') {
            p++;
            continue;
        }
        char *end;
        long v = strtol(p, &end, 10);
        if (v < 1 || v > 65535 || n >= 2 * MAX_CALLS) {
            fprintf(stderr, "rtpload: bad or too many ports in %s\n", path);
            free(ports);
            return -1;
        }
        ports[n++] = (uint16_t)v;
        p = end;
    }
    if (n == 0 || n % 2 != 0) {
        fprintf(stderr, "rtpload: %s has %d ports, want a positive even count\n", path, n);
        free(ports);
        return -1;
    }
    *ports_out = ports;
    return n / 2;
}

static int open_side(void) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("rtpload: socket");
        return -1;
    }
    /* Every relayed flow of one side converges on this socket: a deep queue keeps the
     * load tool from being where packets drop (SO_RCVBUFFORCE passes rmem_max as root). */
    int rcvbuf = 32 << 20, sndbuf = 4 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) != 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("rtpload: bind");
        return -1;
    }
    return fd;
}

static void count_packet(int side, const unsigned char *p, unsigned len,
                         const struct sockaddr_in *src, int64_t now) {
    int32_t f = port_flow[ntohs(src->sin_port)];
    if (f < 0 || src->sin_addr.s_addr != htonl(INADDR_LOOPBACK)) {
        rx_foreign++;
        return;
    }
    if (len < 32 || (p[0] >> 6) != 2 || get32(p + 12) != MAGIC) {
        rx_malformed++;
        return;
    }
    /* Flow 2i arrives at the callee socket, flow 2i+1 at the caller socket, and the
     * payload names the flow it was sent on: anything else went to the wrong leg. */
    if ((int32_t)get32(p + 16) != f || side != (f % 2 == 0 ? CALLEE : CALLER)) {
        rx_misrouted++;
        return;
    }
    if (get32(p + 20) == WARMUP_TICK) {
        rx_warmup++;
        return;
    }
    struct flow_rx *fl = &flows_rx[f];
    fl->received++;
    uint16_t seq = (uint16_t)((p[2] << 8) | p[3]);
    if (fl->have_seq) {
        uint16_t d = (uint16_t)(seq - fl->last_seq);
        if (d != 0 && d < 0x8000) {
            fl->gaps += d - 1;
            fl->last_seq = seq;
        } else {
            fl->reordered++;  /* late or duplicated */
        }
    } else {
        fl->have_seq = 1;
        fl->last_seq = seq;
    }
    int64_t sent_ns;
    memcpy(&sent_ns, p + 24, 8);
    int64_t lat = now - sent_ns;
    if (lat < 0) lat = 0;
    if (lat > lat_max_ns) lat_max_ns = lat;
    int64_t bucket = lat / LAT_BUCKET_NS;
    lat_hist[bucket < LAT_BUCKETS ? bucket : LAT_BUCKETS]++;
}

static void *receiver(void *arg) {
    (void)arg;
    static unsigned char bufs[BATCH][SLOT];
    static struct sockaddr_in srcs[BATCH];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    struct pollfd pfd[2] = {{fds[CALLER], POLLIN, 0}, {fds[CALLEE], POLLIN, 0}};
    while (!atomic_load(&stop_rx)) {
        /* The timeout only bounds how long a stop request waits. */
        if (poll(pfd, 2, 50) <= 0) continue;
        for (int side = 0; side < 2; side++) {
            if (!(pfd[side].revents & POLLIN)) continue;
            for (;;) {
                for (int i = 0; i < BATCH; i++) {
                    iov[i].iov_base = bufs[i];
                    iov[i].iov_len = SLOT;
                    memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
                    msgs[i].msg_hdr.msg_iov = &iov[i];
                    msgs[i].msg_hdr.msg_iovlen = 1;
                    msgs[i].msg_hdr.msg_name = &srcs[i];
                    msgs[i].msg_hdr.msg_namelen = sizeof srcs[i];
                }
                int n = recvmmsg(fds[side], msgs, BATCH, MSG_DONTWAIT, NULL);
                if (n <= 0) break;
                int64_t now = now_ns();
                for (int i = 0; i < n; i++)
                    count_packet(side, bufs[i], msgs[i].msg_len, &srcs[i], now);
                if (n < BATCH) break;
            }
        }
    }
    return NULL;
}

/* Send this tick's packet of every flow of one side; returns datagrams not sent. */
static long send_side(int side, uint32_t tick, uint32_t ts_step) {
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    static int idx[BATCH];
    long errors = 0;
    int f = side == CALLER ? 0 : 1;
    while (f < nflows) {
        int n = 0;
        int64_t stamp = now_ns();
        for (; f < nflows && n < BATCH; f += 2, n++) {
            struct flow *fl = &flows[f];
            fl->seq++;
            fl->stamp += ts_step;
            fl->pkt[2] = (unsigned char)(fl->seq >> 8);
            fl->pkt[3] = (unsigned char)(fl->seq & 0xff);
            put32(fl->pkt + 4, fl->stamp);
            put32(fl->pkt + 20, tick);
            memcpy(fl->pkt + 24, &stamp, 8);
            iov[n].iov_base = fl->pkt;
            iov[n].iov_len = PKT_SIZE;
            memset(&msgs[n].msg_hdr, 0, sizeof msgs[n].msg_hdr);
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
            msgs[n].msg_hdr.msg_name = &fl->dst;
            msgs[n].msg_hdr.msg_namelen = sizeof fl->dst;
            idx[n] = f;
        }
        int done = 0;
        while (done < n) {
            int s = sendmmsg(fds[side], msgs + done, (unsigned)(n - done), 0);
            if (s > 0) {
                for (int i = done; i < done + s; i++)
                    if (tick != WARMUP_TICK) flows[idx[i]].sent++;
                done += s;
            } else if (s < 0 && errno == EINTR) {
                continue;
            } else {
                /* The datagram at the head failed: count it, go on with the rest. */
                errors++;
                done++;
            }
        }
    }
    return errors;
}

static double pct(long part, long whole) {
    return whole > 0 ? 100.0 * (double)part / (double)whole : 0.0;
}

/* The latency below which a share Q of the received packets arrived, in ms: the upper
 * edge of its bucket, or the maximum when it falls past the last bucket. */
static double lat_quantile(long total, double q) {
    if (total <= 0) return 0.0;
    long want = (long)((double)total * q);
    long seen = 0;
    for (int b = 0; b < LAT_BUCKETS; b++) {
        seen += lat_hist[b];
        if (seen > want) return (double)(b + 1) * LAT_BUCKET_NS / 1e6;
    }
    return (double)lat_max_ns / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PORTS_FILE SECONDS [PTIME_MS]\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[2]);
    int ptime_ms = argc > 3 ? atoi(argv[3]) : 20;
    if (seconds <= 0 || seconds > 3600 || ptime_ms < 1 || ptime_ms > 1000) {
        fprintf(stderr, "rtpload: SECONDS must be in (0, 3600], PTIME_MS in 1..1000\n");
        return 2;
    }
    uint16_t *ports;
    int calls = read_ports(argv[1], &ports);
    if (calls < 0) return 1;
    nflows = 2 * calls;
    flows = calloc((size_t)nflows, sizeof *flows);
    flows_rx = calloc((size_t)nflows, sizeof *flows_rx);
    if (!flows || !flows_rx) {
        perror("rtpload: calloc");
        return 1;
    }
    for (int i = 0; i < 65536; i++) port_flow[i] = -1;
    for (int s = 0; s < 2; s++)
        if ((fds[s] = open_side()) < 0) return 1;

    for (int i = 0; i < calls; i++) {
        uint16_t a = ports[2 * i], b = ports[2 * i + 1];
        /* Flow 2i enters at A_i and leaves from B_i; flow 2i+1 the other way round. */
        port_flow[b] = 2 * i;
        port_flow[a] = 2 * i + 1;
        for (int k = 0; k < 2; k++) {
            struct flow *fl = &flows[2 * i + k];
            fl->dst.sin_family = AF_INET;
            fl->dst.sin_port = htons(k == 0 ? a : b);
            fl->dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            uint32_t f = (uint32_t)(2 * i + k);
            fl->seq = (uint16_t)(f * 7919u);
            fl->stamp = f * 104729u;
            unsigned char *p = fl->pkt;
            memset(p, 0xff, PKT_SIZE);  /* mu-law silence */
            p[0] = 0x80;                /* RTP version 2 */
            p[1] = 0x00;                /* PT 0, PCMU */
            put32(p + 8, 0x5a000000u ^ (f * 2654435761u));
            put32(p + 12, MAGIC);
            put32(p + 16, f);
        }
    }
    free(ports);

    pthread_t rx;
    if (pthread_create(&rx, NULL, receiver, NULL) != 0) {
        fprintf(stderr, "rtpload: cannot start the receiver thread\n");
        return 1;
    }

    const int64_t ptime = (int64_t)ptime_ms * 1000000LL;
    const uint32_t ts_step = (uint32_t)ptime_ms * 8;  /* 8 kHz clock */
    const long ticks = (long)(seconds * 1000.0 / ptime_ms + 0.5);
    long send_errors = 0;

    /* Latch every relay port to our sockets before the measured ticks begin. */
    send_errors += send_side(CALLER, WARMUP_TICK, ts_step);
    send_errors += send_side(CALLEE, WARMUP_TICK, ts_step);
    sleep_until(now_ns() + 200000000LL);

    long late_ticks = 0;
    int64_t max_lag = 0, busy = 0, max_busy = 0;
    const int64_t start = now_ns();
    for (long k = 0; k < ticks; k++) {
        int64_t deadline = start + k * ptime;
        sleep_until(deadline);
        int64_t t0 = now_ns();
        if (t0 - deadline > max_lag) max_lag = t0 - deadline;
        send_errors += send_side(CALLER, (uint32_t)k, ts_step);
        send_errors += send_side(CALLEE, (uint32_t)k, ts_step);
        int64_t t1 = now_ns();
        busy += t1 - t0;
        if (t1 - t0 > max_busy) max_busy = t1 - t0;
        if (t1 > deadline + ptime) late_ticks++;
    }
    const int64_t end = now_ns();
    sleep_until(end + DRAIN_NS);
    atomic_store(&stop_rx, 1);
    pthread_join(rx, NULL);

    long sent = 0, received = 0, lost = 0, gaps = 0, reordered = 0, max_lost = 0;
    long flows_with_loss = 0;
    double max_loss_pct = 0.0;
    for (int f = 0; f < nflows; f++) {
        const struct flow *fl = &flows[f];
        const struct flow_rx *fr = &flows_rx[f];
        long l = fl->sent > fr->received ? fl->sent - fr->received : 0;
        sent += fl->sent;
        received += fr->received;
        lost += l;
        gaps += fr->gaps;
        reordered += fr->reordered;
        if (l > 0) flows_with_loss++;
        if (l > max_lost) max_lost = l;
        if (pct(l, fl->sent) > max_loss_pct) max_loss_pct = pct(l, fl->sent);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_s = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                   (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    /* The schedule's length, not the time the last tick took to send. */
    double wall = (double)ticks * (double)ptime / 1e9;
    printf("{\"tool\":\"rtpload\",\"calls\":%d,\"flows\":%d,\"ptime_ms\":%d,\"ticks\":%ld,"
           "\"seconds\":%.3f,\"sent\":%ld,\"received\":%ld,\"lost\":%ld,\"loss_pct\":%.4f,"
           "\"flows_with_loss\":%ld,\"max_flow_lost\":%ld,\"max_flow_loss_pct\":%.3f,"
           "\"seq_gaps\":%ld,\"reordered\":%ld,\"misrouted\":%ld,\"foreign\":%ld,"
           "\"malformed\":%ld,\"warmup_received\":%ld,\"send_errors\":%ld,\"sent_pps\":%.0f,"
           "\"latency_ms\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.2f},"
           "\"late_ticks\":%ld,\"max_tick_lag_ms\":%.3f,\"max_tick_send_ms\":%.3f,"
           "\"sender_busy_pct\":%.1f,\"behind\":%s,\"cpu_s\":%.3f}\n",
           calls, nflows, ptime_ms, ticks, wall, sent, received, lost, pct(lost, sent),
           flows_with_loss, max_lost, max_loss_pct, gaps, reordered, rx_misrouted, rx_foreign,
           rx_malformed, rx_warmup, send_errors, wall > 0 ? (double)sent / wall : 0.0,
           lat_quantile(received, 0.50), lat_quantile(received, 0.99),
           (double)lat_max_ns / 1e6, late_ticks, (double)max_lag / 1e6,
           (double)max_busy / 1e6, wall > 0 ? 100.0 * (double)busy / 1e9 / wall : 0.0,
           late_ticks * 100 > ticks ? "true" : "false", cpu_s);
    free(flows);
    free(flows_rx);
    return 0;
}
