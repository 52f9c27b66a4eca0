/*
 * Counting UDP sink for the relay ceiling.
 *
 *   sink PORT [IDLE_MS [MAX_SECONDS]]
 *
 * Binds 127.0.0.1:PORT and counts datagrams with recvmmsg in batches of 64.  Stops once
 * IDLE_MS (default 1000) pass without a packet after the first one arrived, on SIGTERM or
 * SIGINT, or after MAX_SECONDS (default 120) in all.
 *
 * Prints one JSON line on stdout; seconds and pps span the first to the last packet:
 *   {"tool":"sink","received":N,"bytes":B,"seconds":S,"pps":P}
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
#define SLOT 2048

static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [IDLE_MS [MAX_SECONDS]]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    double idle = (argc > 2 ? atof(argv[2]) : 1000.0) / 1000.0;
    double max_seconds = argc > 3 ? atof(argv[3]) : 120.0;

    /* No SA_RESTART: a signal must interrupt the blocking recvmmsg. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("sink: socket");
        return 1;
    }
    /* A deep receive queue keeps the sink from being the place where packets drop;
     * SO_RCVBUFFORCE passes rmem_max when running as root. */
    int rcvbuf = 16 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct timeval tick = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof tick);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("sink: bind");
        return 1;
    }

    static unsigned char buf[BATCH][SLOT];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    long received = 0;
    long long bytes = 0;
    double start = now_s(), first = 0.0, last = 0.0;
    while (!stop_requested) {
        double t = now_s();
        if (t - start > max_seconds) break;
        if (received > 0 && t - last > idle) break;
        memset(msgs, 0, sizeof msgs);
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = buf[i];
            iov[i].iov_len = SLOT;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        /* MSG_WAITFORONE: block for the first datagram only, then take what is queued. */
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) continue;
        last = now_s();
        if (received == 0) first = last;
        received += n;
        for (int i = 0; i < n; i++) bytes += msgs[i].msg_len;
    }
    double span = last - first;
    printf("{\"tool\":\"sink\",\"received\":%ld,\"bytes\":%lld,\"seconds\":%.3f,\"pps\":%.0f}\n",
           received, bytes, span, span > 0 ? (double)received / span : 0.0);
    return 0;
}
