/* bf16 as raw uint16 bits, shared by the CPU kernels: widening to fp32 is exact (a 16-bit
 * shift), narrowing rounds to nearest, ties to even, and keeps NaN a quiet NaN. */
#ifndef LORAMUX_BF16_H
#define LORAMUX_BF16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (bf16)(u >> 16);
}

#endif
