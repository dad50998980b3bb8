/* bitfloor.c - the C floor of a bitmap run replay: a find_next_bit / find_next_zero_bit
 * style iterator (one word at a time, as Linux's lib/find_bit does) that calls a
 * function for every maximal run of set bits in [START, END), over a bitmap read from a
 * file (bit i in 64-bit little-endian word i / 64 at bit i % 64).
 *
 * usage: bitfloor replay|allset FILE NBITS START END MIN_MS
 * "allset" instead answers whether every bit of [START, END) is set (one
 * find_next_zero_bit), reported as runs 1 (yes) or 0.
 * Repeats the work until MIN_MS milliseconds were spent (at least 3 times) and prints one
 * JSON line: {"runs":R,"bits":B,"best_ns":N}. Exit status: 0 ok, 1 I/O error, 2 usage.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* first bit >= off in [0, end) equal to 1 (flip = 0) or 0 (flip = ~0); end if none */
static inline size_t find_next(const uint64_t *w, size_t end, size_t off, uint64_t flip)
{
    if (off >= end)
        return end;
    size_t i = off >> 6, last = (end - 1) >> 6;
    uint64_t x = (w[i] ^ flip) & (~0ULL << (off & 63));
    while (!x) {
        if (++i > last)
            return end;
        x = w[i] ^ flip;
    }
    size_t r = (i << 6) + (size_t)__builtin_ctzll(x);
    return r < end ? r : end;
}

struct tally { size_t runs, bits; };

__attribute__((noinline)) static void on_run(void *ctx, size_t s, size_t e)
{
    struct tally *t = ctx;
    t->runs++;
    t->bits += e - s;
}

static void (*volatile callback)(void *, size_t, size_t) = on_run;

static void replay(const uint64_t *w, size_t start, size_t end, struct tally *t)
{
    void (*cb)(void *, size_t, size_t) = callback;
    size_t pos = start;
    for (;;) {
        size_t s = find_next(w, end, pos, 0);
        if (s >= end)
            return;
        size_t e = find_next(w, end, s, ~0ULL);
        cb(t, s, e);
        pos = e;
    }
}

int main(int argc, char **argv)
{
    if (argc != 7 || (strcmp(argv[1], "replay") && strcmp(argv[1], "allset"))) {
        fprintf(stderr, "usage: bitfloor replay|allset FILE NBITS START END MIN_MS\n");
        return 2;
    }
    int allset = !strcmp(argv[1], "allset");
    argv++;
    size_t nbits = strtoull(argv[2], NULL, 0), start = strtoull(argv[3], NULL, 0);
    size_t end = strtoull(argv[4], NULL, 0);
    double min_ms = atof(argv[5]);
    if (start > end || end > nbits) {
        fprintf(stderr, "bitfloor: bad range\n");
        return 2;
    }
    size_t nwords = (nbits + 63) / 64;
    uint64_t *w = aligned_alloc(64, (nwords * 8 + 63) & ~(size_t)63);
    FILE *f = fopen(argv[1], "rb");
    if (!w || !f || fread(w, 8, nwords, f) != nwords) {
        fprintf(stderr, "bitfloor: cannot read %zu words from %s\n", nwords, argv[1]);
        return 1;
    }
    fclose(f);
    struct tally t = { 0, 0 };
    int64_t best = INT64_MAX, spent = 0;
    for (int i = 0; i < 3 || (spent < min_ms * 1e6 && i < 100000); i++) {
        t = (struct tally){ 0, 0 };
        int64_t t0 = now_ns();
        if (allset)
            t.runs = find_next(w, end, start, ~0ULL) >= end;
        else
            replay(w, start, end, &t);
        int64_t dt = now_ns() - t0;
        spent += dt;
        if (dt < best)
            best = dt;
    }
    printf("{\"runs\":%zu,\"bits\":%zu,\"best_ns\":%lld}\n", t.runs, t.bits, (long long)best);
    return 0;
}
