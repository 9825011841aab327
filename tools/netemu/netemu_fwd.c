/* TAP forwarder with a fixed one-way delay between two network namespaces (see netemu.py).
 * usage: fwd NETNS_PATH_A NETNS_PATH_B TAP_NAME DELAY_NS
 * Creates TAP_NAME in each namespace, prints "ready", then copies every Ethernet frame from one
 * tap to the other, each released DELAY_NS after it was read (FIFO: order is kept). Exits when
 * its parent dies, on SIGTERM, or on any error. Runs SCHED_FIFO with 1 ns timer slack so that
 * a release is not late by a scheduler tick when the cores are busy. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 8192
#define SPIN_NS 20000
#define BURST 4
#define SLOT_BYTES 2048 /* MTU 1500 + Ethernet header; no offloads are enabled on the taps */

struct frame { uint64_t due; int len; unsigned char data[SLOT_BYTES]; };
struct queue { struct frame *f; unsigned head, tail; uint64_t dropped, sent, late_ns, late_max_ns; };

static volatile sig_atomic_t stop_flag = 0;
static void on_term(int sig) { (void)sig; stop_flag = 1; }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int open_tap_in(const char *netns_path, const char *name) {
    int ns = open(netns_path, O_RDONLY | O_CLOEXEC);
    if (ns < 0 || setns(ns, CLONE_NEWNET) != 0) { perror(netns_path); exit(3); }
    close(ns);
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) { perror("/dev/net/tun"); exit(3); }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) != 0) { perror("TUNSETIFF"); exit(3); }
    return fd;
}

/* Read up to BURST frames waiting on fd into q, each due at now + delay; 1 if more may wait.
 * Few at a time, so that a long burst (a 64 KiB message is 44 frames) is not held back while
 * the rest of it is read: each frame leaves as soon as it is due. */
static int pull(int fd, struct queue *q, uint64_t delay) {
    for (int i = 0; i < BURST; i++) {
        if (q->tail - q->head >= SLOTS) {  /* full: drop like a congested link would */
            unsigned char scratch[SLOT_BYTES];
            if (read(fd, scratch, sizeof scratch) < 0) return 0;
            q->dropped++;
            continue;
        }
        struct frame *fr = &q->f[q->tail % SLOTS];
        ssize_t n = read(fd, fr->data, SLOT_BYTES);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            perror("read"); exit(4);
        }
        fr->len = (int)n;
        fr->due = now_ns() + delay;
        q->tail++;
    }
    return 1;
}

/* Write every due frame of q to fd; returns ns until the next one is due (or -1 if empty). */
static int64_t push(int fd, struct queue *q) {
    uint64_t t = now_ns();
    while (q->head != q->tail) {
        struct frame *fr = &q->f[q->head % SLOTS];
        if (fr->due > t) return (int64_t)(fr->due - t);
        if (write(fd, fr->data, fr->len) < 0 && errno != EAGAIN && errno != EIO) { perror("write"); exit(4); }
        uint64_t late = t - fr->due;
        q->late_ns += late;
        if (late > q->late_max_ns) q->late_max_ns = late;
        q->sent++;
        q->head++;
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s NETNS_A NETNS_B TAP DELAY_NS\n", argv[0]); return 2; }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1) return 0;  /* parent already gone */
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    uint64_t delay = strtoull(argv[4], NULL, 10);
    int fd[2] = {open_tap_in(argv[1], argv[3]), open_tap_in(argv[2], argv[3])};
    struct queue q[2];  /* q[i]: frames read from fd[i], to be written to fd[1 - i] */
    for (int i = 0; i < 2; i++) {
        q[i].f = calloc(SLOTS, sizeof(struct frame));
        q[i].head = q[i].tail = 0;
        q[i].dropped = q[i].sent = q[i].late_ns = q[i].late_max_ns = 0;
        if (!q[i].f) { perror("calloc"); return 5; }
    }
    prctl(PR_SET_TIMERSLACK, 1);
    struct sched_param sp = {.sched_priority = 10};
    int rt = sched_setscheduler(0, SCHED_FIFO, &sp) == 0;
    printf("ready %s\n", rt ? "sched_fifo" : "sched_other");
    fflush(stdout);
    struct pollfd pfd[2] = {{fd[0], POLLIN, 0}, {fd[1], POLLIN, 0}};
    int more = 0;
    while (!stop_flag) {
        int64_t wait = more ? 0 : 200000000;  /* wake at least every 0.2 s to notice a stop request */
        for (int i = 0; i < 2; i++) {
            int64_t w = push(fd[1 - i], &q[i]);
            if (w >= 0 && w < wait) wait = w;
        }
        /* sleep until SPIN_NS before the next release, then poll without sleeping: a wake-up
         * from a timer is late by a few microseconds, more on a busy or virtual machine */
        wait = wait > SPIN_NS ? wait - SPIN_NS : 0;
        struct timespec ts = {(time_t)(wait / 1000000000), (long)(wait % 1000000000)};
        int n = ppoll(pfd, 2, &ts, NULL);
        if (n < 0 && errno != EINTR) { perror("ppoll"); return 4; }
        more = 0;
        for (int i = 0; i < 2; i++)
            if (n > 0 && (pfd[i].revents & POLLIN)) more |= pull(fd[i], &q[i], delay);
    }
    for (int i = 0; i < 2; i++)
        fprintf(stderr, "netemu forwarder: %d->%d sent %llu frames, dropped %llu, late mean %.1f us max %.1f us\n",
                i, 1 - i, (unsigned long long)q[i].sent, (unsigned long long)q[i].dropped,
                q[i].sent ? q[i].late_ns / 1e3 / q[i].sent : 0.0, q[i].late_max_ns / 1e3);
    return 0;
}
