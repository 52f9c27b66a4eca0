/*
 * The machine's UDP relay ceiling: the least work a media relay can do per packet.
 *
 *   relay IN_PORT OUT_PORT [MAX_SECONDS [IDLE_MS]]
 *
 * Receives on 127.0.0.1:IN_PORT with recvmmsg and forwards every datagram unchanged to
 * 127.0.0.1:OUT_PORT with sendmmsg, in batches of up to 64, from one thread.  Runs until
 * SIGTERM or SIGINT, until MAX_SECONDS (default 300) have passed, or, when IDLE_MS is
 * given and not 0, until that long passes without a packet after the first one.
 *
 * Prints one JSON line on stdout; seconds and pps span the first to the last packet:
 *   {"tool":"relay","relayed":N,"send_errors":E,"batches":B,"seconds":S,"pps":P}
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
    if (argc < 3) {
        fprintf(stderr, "usage: %s IN_PORT OUT_PORT [MAX_SECONDS [IDLE_MS]]\n", argv[0]);
        return 2;
    }
    int in_port = atoi(argv[1]);
    int out_port = atoi(argv[2]);
    double max_seconds = argc > 3 ? atof(argv[3]) : 300.0;
    double idle = (argc > 4 ? atof(argv[4]) : 0.0) / 1000.0;

    /* No SA_RESTART: a signal must interrupt the blocking recvmmsg. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("relay: socket");
        return 1;
    }
    int rcvbuf = 16 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    /* Wake up regularly so the deadline and the idle limit are checked without traffic. */
    struct timeval tick = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof tick);
    struct sockaddr_in in_addr;
    memset(&in_addr, 0, sizeof in_addr);
    in_addr.sin_family = AF_INET;
    in_addr.sin_port = htons((uint16_t)in_port);
    in_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&in_addr, sizeof in_addr) != 0) {
        perror("relay: bind");
        return 1;
    }
    struct sockaddr_in out_addr = in_addr;
    out_addr.sin_port = htons((uint16_t)out_port);

    static unsigned char buf[BATCH][SLOT];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    long relayed = 0, send_errors = 0, batches = 0;
    double start = now_s(), first = 0.0, last = 0.0;
    while (!stop_requested) {
        double t = now_s();
        if (t - start > max_seconds) break;
        if (idle > 0 && batches > 0 && t - last > idle) break;
        memset(msgs, 0, sizeof msgs);
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = buf[i];
            iov[i].iov_len = SLOT;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        /* MSG_WAITFORONE: never hold a packet back waiting for a full batch. */
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) continue;
        if (batches == 0) first = now_s();
        for (int i = 0; i < n; i++) {
            iov[i].iov_len = msgs[i].msg_len;
            msgs[i].msg_hdr.msg_name = &out_addr;
            msgs[i].msg_hdr.msg_namelen = sizeof out_addr;
        }
        int done = 0;
        while (done < n) {
            int s = sendmmsg(fd, msgs + done, (unsigned)(n - done), 0);
            if (s > 0) {
                done += s;
            } else if (s < 0 && errno == EINTR) {
                continue;
            } else {
                /* The datagram at the head of the batch failed: drop it, keep the rest. */
                send_errors++;
                done++;
            }
        }
        relayed += n;
        batches++;
        last = now_s();
    }
    relayed -= send_errors;
    double span = last - first;
    printf("{\"tool\":\"relay\",\"relayed\":%ld,\"send_errors\":%ld,\"batches\":%ld,"
           "\"seconds\":%.3f,\"pps\":%.0f}\n",
           relayed, send_errors, batches, span, span > 0 ? (double)relayed / span : 0.0);
    return 0;
}
