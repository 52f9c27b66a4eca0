/* Acquire/release access to the call-control ring's shared 64-bit cursors.
 *
 * The writer fills a slot with plain stores and then publishes it with a
 * release store of the write cursor; a reader that acquire-loads the cursor
 * and sees the new value is guaranteed to see every byte of the slot. The
 * same pairing, the other way round, lets the reader hand slots back through
 * its released position. On x86-64 both compile to plain moves plus a
 * compiler barrier; on weakly ordered CPUs they emit the needed fences.
 */
#ifndef BATON_RING_ATOMIC_H
#define BATON_RING_ATOMIC_H

#include <stdint.h>

/* The two processes share no lock table: a lock-based fallback for 64-bit
 * atomics would be silently wrong across processes. */
_Static_assert(__atomic_always_lock_free(sizeof(uint64_t), 0),
               "the ring needs lock-free 64-bit atomics");

static inline uint64_t ring_load_acquire(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void ring_store_release(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

#endif /* BATON_RING_ATOMIC_H */
