/*
 * The kernels' own thread pool: spin briefly, then sleep.
 *
 * Rule: a task runs on nth threads (the caller is thread 0) and returns when all of them are
 * done; inside it, st_sync() is a barrier of those nth threads. A thread that waits (a worker
 * for the next task, a thread at a barrier, the caller for its workers) first spins for
 * ST_POOL_SPIN_US microseconds (default 100), then sleeps on a futex. Spinning covers the few
 * microseconds between the layers' native calls on a quiet machine; sleeping after it keeps a
 * waiting thread from taking a core that a busy neighbour, or a thread of this task that the
 * kernel preempted, needs. (OpenMP offers only one fixed policy per process, set through the
 * environment, which then leaks into every program the process starts.)
 *
 * nth is omp_get_max_threads() (so torch.set_num_threads applies), at most ST_POOL_MAX threads.
 * One task at a time: a call made while another thread's task holds the pool runs inline on
 * its caller alone (results never depend on the thread count: see q4_0.c). Workers start at the
 * first task that needs them; a forked child starts with none of its parent's.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#include "q4_0.h"

#define ST_POOL_MAX 64

static struct {
    pthread_mutex_t busy;          /* held by the caller of the task in flight */
    pthread_mutex_t grow;          /* held while workers are started */
    int workers;                   /* worker threads started (thread ids 1 .. workers) */
    int64_t spin_ns;
    /* the task in flight */
    st_task fn;
    void *arg;
    int nth;
    _Atomic uint32_t generation;   /* bumped to start a task (futex word) */
    _Atomic int running;           /* workers still inside the current task */
    _Atomic uint32_t finished;     /* bumped when the last worker leaves (futex word) */
    /* st_sync */
    _Atomic int arrived;
    _Atomic uint32_t phase;        /* bumped when the last thread arrives (futex word) */
    _Atomic int sleepers;          /* threads asleep (or about to sleep) on any futex word */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void futex_wait(_Atomic uint32_t *word, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *word) {
    if (atomic_load(&pool.sleepers) > 0) syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, ST_POOL_MAX, NULL, NULL, 0);
}

/* Wait until *word != seen: spin for the pool's spin time, then sleep; returns the new value. */
static uint32_t await_change(_Atomic uint32_t *word, uint32_t seen) {
    uint32_t v = atomic_load_explicit(word, memory_order_acquire);
    if (v != seen) return v;
    const int64_t deadline = pool.spin_ns > 0 ? now_ns() + pool.spin_ns : 0;
    for (int i = 1; pool.spin_ns > 0; i++) {
        cpu_relax();
        if ((v = atomic_load_explicit(word, memory_order_acquire)) != seen) return v;
        if ((i & 63) == 0 && now_ns() > deadline) break;
    }
    atomic_fetch_add(&pool.sleepers, 1);
    while ((v = atomic_load(word)) == seen) futex_wait(word, seen);
    atomic_fetch_sub(&pool.sleepers, 1);
    return v;
}

static uint32_t start_generation[ST_POOL_MAX];   /* the generation before a worker's first task */

static void *worker_main(void *p) {
    const int ith = (int)(intptr_t)p;
    uint32_t seen = start_generation[ith];
    for (;;) {
        seen = await_change(&pool.generation, seen);
        if (ith >= pool.nth) continue;   /* not needed for this task */
        pool.fn(pool.arg, ith, pool.nth);
        if (atomic_fetch_sub(&pool.running, 1) == 1) {
            atomic_fetch_add(&pool.finished, 1);
            futex_wake_all(&pool.finished);
        }
    }
    return NULL;
}

static void forget_workers(void) {   /* in a forked child: the parent's workers do not exist here */
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.grow, NULL);
    pool.workers = 0;
    atomic_store(&pool.sleepers, 0);
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void pool_init(void) {
    const char *spin = getenv("ST_POOL_SPIN_US");
    pool.spin_ns = (spin && *spin ? atoll(spin) : 100) * 1000;
    pthread_atfork(NULL, NULL, forget_workers);
}

/* Start workers until there are n - 1 of them; returns how many threads a task can use. */
static int ensure_workers(int n) {
    pthread_mutex_lock(&pool.grow);
    while (pool.workers < n - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 8 << 20);   /* the kernels keep per-thread rows on the stack */
        start_generation[pool.workers + 1] = atomic_load(&pool.generation);
        const int ok = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(pool.workers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.workers++;
    }
    const int usable = pool.workers + 1;
    pthread_mutex_unlock(&pool.grow);
    return n < usable ? n : usable;
}

void st_run(st_task fn, void *arg, int parallel) {
    pthread_once(&pool_once, pool_init);
    int nth = parallel ? omp_get_max_threads() : 1;
    if (nth > ST_POOL_MAX) nth = ST_POOL_MAX;
    if (nth <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(arg, 0, 1);
        return;
    }
    nth = ensure_workers(nth);
    if (nth <= 1) {
        pthread_mutex_unlock(&pool.busy);
        fn(arg, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    pool.nth = nth;
    atomic_store(&pool.arrived, 0);
    atomic_store(&pool.running, nth - 1);
    const uint32_t done = atomic_load(&pool.finished);
    atomic_fetch_add(&pool.generation, 1);     /* publishes fn, arg, nth (seq_cst) */
    futex_wake_all(&pool.generation);
    fn(arg, 0, nth);
    await_change(&pool.finished, done);
    pthread_mutex_unlock(&pool.busy);
}

void st_sync(int nth) {
    if (nth <= 1) return;
    const uint32_t phase = atomic_load(&pool.phase);
    if (atomic_fetch_add(&pool.arrived, 1) == nth - 1) {
        atomic_store(&pool.arrived, 0);
        atomic_fetch_add(&pool.phase, 1);
        futex_wake_all(&pool.phase);
    } else {
        await_change(&pool.phase, phase);
    }
}

/* For tests and benchmarks: the spin time in microseconds (< 0: leave it), returns the one in force. */
int64_t st_pool_spin_us(int64_t us) {
    pthread_once(&pool_once, pool_init);
    if (us >= 0) pool.spin_ns = us * 1000;
    return pool.spin_ns / 1000;
}
