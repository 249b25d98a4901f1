/* bench/slow-sync/slowsync.c: an LD_PRELOAD shim that makes every fdatasync()
 * and fsync() of the process it is loaded into take SLOW_SYNC_US microseconds
 * longer, sleeping (no CPU), as a disk with a slower cache flush would.
 *
 * For measuring the server against slower disks than the machine has
 * (bench/slow-sync.sh); not for production. The real call runs first, so
 * durability is unchanged: only the answer comes later.
 *
 * By default the sleeps of syncs in flight at once overlap, as on a device
 * that flushes several requests in parallel. With SLOW_SYNC_SERIAL=1 they
 * take turns (one process-wide lock held across each sleep), as on a device
 * that flushes one request at a time.
 *
 * Build: cc -O2 -shared -fPIC -o slowsync.so slowsync.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

static long delay_us = -1;
static int serial = 0;
static pthread_mutex_t one_at_a_time = PTHREAD_MUTEX_INITIALIZER;

static void pause_us(void) {
    if (delay_us < 0) {
        const char *v = getenv("SLOW_SYNC_US");
        const char *s = getenv("SLOW_SYNC_SERIAL");
        serial = s && atoi(s) != 0;
        delay_us = v ? atol(v) : 0;
    }
    if (delay_us <= 0) return;
    struct timespec t = { delay_us / 1000000, (delay_us % 1000000) * 1000 };
    int saved = errno;
    if (serial) pthread_mutex_lock(&one_at_a_time);
    while (clock_nanosleep(CLOCK_MONOTONIC, 0, &t, &t) == EINTR) {}
    if (serial) pthread_mutex_unlock(&one_at_a_time);
    errno = saved;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int r = real(fd);
    pause_us();
    return r;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int r = real(fd);
    pause_us();
    return r;
}
