/* Worker threads of the compiled passes (mflightning.limit.native): a pass split into parts runs
 * part 0 on the calling thread and part i on worker i.
 *
 * A worker that has finished a part spins for SPIN_NS before it sleeps, so that the next pass
 * of the same step (a few hundred microseconds later) finds it awake: on the project's 2-vCPU
 * virtual machine, waking a sleeping thread took 65-150 us, as long as half of a pass at
 * M = 4096, and a Python thread pool cannot spin without holding the GIL. One pass at a time:
 * a second caller meanwhile (another Python thread) runs its parts itself, one after another. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

typedef void (*mfl_task)(void *context, int part);

enum { MAX_WORKERS = 63 };
static const int64_t SPIN_NS = 1000000; /* a worker spins 1 ms after its last part */

static struct {
    pthread_mutex_t busy;       /* held by the pass in flight */
    pthread_mutex_t lock;       /* guards sleeping and the condition */
    pthread_cond_t posted;      /* a new pass (or a wake-up) was posted */
    atomic_ulong generation;    /* count of posted passes */
    atomic_int remaining;       /* workers that have not finished the pass in flight */
    mfl_task task;              /* the pass in flight (NULL: a wake-up) */
    void *context;
    int parts;
    int workers;   /* started (part i runs on worker i, 1 <= i <= workers) */
    int sleeping;  /* workers waiting on the condition */
    int registered; /* the fork handler is installed */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The next generation after `seen`: spinning for SPIN_NS, then asleep on the condition. */
static unsigned long wait_for_pass(unsigned long seen) {
    const int64_t start = now_ns();
    for (unsigned spins = 1;; ++spins) {
        const unsigned long current = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (current != seen)
            return current;
        RELAX();
        if (spins % 256 == 0 && now_ns() - start > SPIN_NS)
            break;
    }
    pthread_mutex_lock(&pool.lock);
    ++pool.sleeping;
    unsigned long current;
    while ((current = atomic_load(&pool.generation)) == seen)
        pthread_cond_wait(&pool.posted, &pool.lock);
    --pool.sleeping;
    pthread_mutex_unlock(&pool.lock);
    return current;
}

/* Every worker takes part in every generation (one without a part of its own only reports):
 * the caller waits for all of them, so none can still be reading the previous pass's job. */
static void *work(void *argument) {
    const int index = (int)(intptr_t)argument;
    unsigned long seen = atomic_load(&pool.generation) - 1; /* the one that started it */
    for (;;) {
        seen = wait_for_pass(seen);
        if (pool.task != NULL && index < pool.parts)
            pool.task(pool.context, index);
        atomic_fetch_sub_explicit(&pool.remaining, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* In a forked child only the forking thread exists: forget the workers (started again). */
static void after_fork_in_child(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.posted, NULL);
    atomic_store(&pool.remaining, 0);
    pool.workers = pool.sleeping = 0;
}

/* Wait until every worker has finished the pass in flight. */
static void wait_for_workers(void) {
    for (unsigned spins = 1; atomic_load_explicit(&pool.remaining, memory_order_acquire) > 0;
         ++spins)
        RELAX();
}

/* Post a pass to the workers (the pool is held, the previous pass finished). Starts workers up
 * to `wanted` first; they begin in the posted generation. */
static void post(mfl_task task, void *context, int parts, int wanted) {
    if (!pool.registered)
        pool.registered = pthread_atfork(NULL, NULL, after_fork_in_child) == 0;
    pool.task = task;
    pool.context = context;
    pool.parts = parts;
    pthread_mutex_lock(&pool.lock);
    int workers = pool.workers;
    atomic_store(&pool.remaining, workers);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    if (pool.sleeping > 0)
        pthread_cond_broadcast(&pool.posted);
    pthread_mutex_unlock(&pool.lock);
    while (workers < wanted && workers < MAX_WORKERS) {
        pthread_t thread;
        atomic_fetch_add(&pool.remaining, 1); /* before it starts, so that it is waited for */
        if (pthread_create(&thread, NULL, work, (void *)(intptr_t)(workers + 1)) != 0) {
            atomic_fetch_sub(&pool.remaining, 1);
            break;
        }
        pthread_detach(thread);
        pool.workers = ++workers;
    }
}

/* Run task(context, i) for 0 <= i < parts: part 0 here, the others on the workers (or here,
 * one after another, when another pass is in flight or a worker could not be started). */
void mfl_pool_run(mfl_task task, void *context, int parts) {
    if (parts <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int i = 0; i < parts; ++i)
            task(context, i);
        return;
    }
    wait_for_workers(); /* a wake-up still being reported */
    post(task, context, parts, parts - 1);
    task(context, 0);
    for (int i = pool.workers + 1; i < parts; ++i) /* parts no worker holds */
        task(context, i);
    wait_for_workers();
    pthread_mutex_unlock(&pool.busy);
}

/* Wake `workers` workers (starting them if needed) without waiting: they spin from now on, so
 * that the next pass does not wait for them to wake. */
void mfl_pool_wake(int workers) {
    if (workers < 1 || pthread_mutex_trylock(&pool.busy) != 0)
        return;
    wait_for_workers();
    post(NULL, NULL, 0, workers);
    pthread_mutex_unlock(&pool.busy);
}
