/* plugfloor.c - the kernel-level floor of ramdiscard's virtio-mem PLUG and UNPLUG of N
 * blocks with an io_uring pinning consumer: the same syscalls in the same order, issued
 * from C with nothing around them.
 *
 *   plug     = [prealloc: madvise(MADV_POPULATE_WRITE) of the range]
 *              one IORING_REGISTER_BUFFERS_UPDATE of N slots, one iovec per block (pins)
 *   unplug   = discard of the range (anonymous: madvise(MADV_DONTNEED); memfd:
 *              fallocate(PUNCH_HOLE | KEEP_SIZE)), then one BUFFERS_UPDATE of the N slots
 *              with empty iovecs (unpins; only then is the memory freed)
 *
 * The memory is what ramdiscard's RamBlock maps: private anonymous MAP_NORESERVE, 2 MiB
 * aligned, MADV_HUGEPAGE when THP is asked for; or a shared memfd mapping. The buffer
 * table is a sparse table of SLOTS entries registered once (IORING_REGISTER_BUFFERS2).
 *
 * usage: plugfloor anon|memfd THP(0|1) BLOCK_SIZE BLOCKS SLOTS
 * Prints {"ready":true} after setup, then reads one mode per stdin line and answers one
 * JSON line per cycle: {"plug_ns":N,"unplug_ns":N}, or {"error":"..."} (then exits 1).
 * Modes: "cold" (the pin faults the memory in), "warm" (an untimed populate first),
 * "prealloc" (the populate is timed as part of the plug). "q" or EOF ends.
 * Exit status: 0 ok, 1 a syscall failed, 2 bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#endif

enum { REG_BUFFERS2 = 15, REG_BUFFERS_UPDATE = 16, RSRC_SPARSE = 1 };

struct rsrc_register { uint32_t nr, flags; uint64_t resv2, data, tags; };
struct rsrc_update2 { uint32_t offset, resv; uint64_t data, tags; uint32_t nr, resv2; };

static int ring = -1, memfd = -1;
static char *base;
static size_t length;
static long nblocks;
static struct iovec *pins, *empties;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what)
{
    printf("{\"error\":\"%s: %s\"}\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static void update(struct iovec *iov)
{
    struct rsrc_update2 up = { .offset = 0, .data = (uint64_t)(uintptr_t)iov, .nr = (uint32_t)nblocks };
    long r = syscall(__NR_io_uring_register, ring, REG_BUFFERS_UPDATE, &up, sizeof up);
    if (r != nblocks) {
        if (r >= 0)
            errno = EIO;
        die("io_uring_register(BUFFERS_UPDATE)");
    }
}

static void discard(void)
{
    if (memfd >= 0) {
        if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)length))
            die("fallocate(PUNCH_HOLE)");
    } else if (madvise(base, length, MADV_DONTNEED)) {
        die("madvise(MADV_DONTNEED)");
    }
}

static void populate(void)
{
    if (madvise(base, length, MADV_POPULATE_WRITE))
        die("madvise(MADV_POPULATE_WRITE)");
}

static void setup(int use_memfd, int thp, size_t block, long slots)
{
    if (use_memfd) {
        memfd = (int)syscall(SYS_memfd_create, "plugfloor", 0);
        if (memfd < 0 || ftruncate(memfd, (off_t)length))
            die("memfd");
        base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        if (base == MAP_FAILED)
            die("mmap memfd");
    } else {
        size_t align = 2UL << 20;
        char *p = mmap(NULL, length + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            die("mmap reservation");
        char *a = (char *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
        base = mmap(a, length, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        if (base == MAP_FAILED)
            die("mmap region");
        if (thp && madvise(base, length, MADV_HUGEPAGE))
            die("madvise(MADV_HUGEPAGE)");
    }
    uint32_t params[30]; /* struct io_uring_params, zeroed */
    memset(params, 0, sizeof params);
    ring = (int)syscall(__NR_io_uring_setup, 8, params);
    if (ring < 0)
        die("io_uring_setup");
    struct rsrc_register reg = { .nr = (uint32_t)slots, .flags = RSRC_SPARSE };
    if (syscall(__NR_io_uring_register, ring, REG_BUFFERS2, &reg, sizeof reg) < 0)
        die("io_uring_register(BUFFERS2, sparse)");
    pins = calloc((size_t)nblocks, sizeof *pins);
    empties = calloc((size_t)nblocks, sizeof *empties);
    for (long i = 0; i < nblocks; i++)
        pins[i] = (struct iovec){ base + (size_t)i * block, block };
}

int main(int argc, char **argv)
{
    if (argc != 6 || (strcmp(argv[1], "anon") && strcmp(argv[1], "memfd"))) {
        fprintf(stderr, "usage: plugfloor anon|memfd THP(0|1) BLOCK_SIZE BLOCKS SLOTS\n");
        return 2;
    }
    size_t block = strtoull(argv[3], NULL, 0);
    nblocks = atol(argv[4]);
    long slots = atol(argv[5]);
    if (!block || block % 4096 || nblocks < 1 || slots < nblocks) {
        fprintf(stderr, "plugfloor: bad geometry\n");
        return 2;
    }
    length = block * (size_t)nblocks;
    setup(!strcmp(argv[1], "memfd"), atoi(argv[2]), block, slots);
    printf("{\"ready\":true}\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = '\0';
        int prealloc = !strcmp(line, "prealloc");
        if (!strcmp(line, "warm"))
            populate();
        else if (strcmp(line, "cold") && !prealloc)
            break;
        int64_t t0 = now_ns();
        if (prealloc)
            populate();
        update(pins);
        int64_t t1 = now_ns();
        discard();
        update(empties);
        int64_t t2 = now_ns();
        printf("{\"plug_ns\":%lld,\"unplug_ns\":%lld}\n", (long long)(t1 - t0), (long long)(t2 - t1));
        fflush(stdout);
    }
    return 0;
}
