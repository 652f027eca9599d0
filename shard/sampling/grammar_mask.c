/* A grammar's token mask applied to one row of logits: logits[i] = -inf wherever bit i of the
 * bitmask is 0 (llguidance's layout: token i is bit i % 32 of 32-bit word i / 32, least
 * significant first). Loaded by shard/sampling/grammar.py, whose GrammarState.mask_reference (PyTorch's
 * masked_fill) is the reference the tests compare it with: masked_fill takes ~160 us for a
 * 49k-token row on these CPUs, branching on every token; whole words of allowed tokens are
 * skipped here, and the rest is a loop GCC vectorizes. */
#include <math.h>
#include <stdint.h>

void mask_logits(float *logits, const uint32_t *allowed, long vocab) {
    for (long w = 0; w * 32 < vocab; w++) {
        uint32_t word = allowed[w];
        if (word == 0xFFFFFFFFu) continue;
        long base = w * 32, n = vocab - base < 32 ? vocab - base : 32;
        for (long i = 0; i < n; i++)
            logits[base + i] = (word >> i) & 1u ? logits[base + i] : -INFINITY;
    }
}
