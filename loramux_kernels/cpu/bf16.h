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

#ifdef __AVX512F__
#include <immintrin.h>

/* 16 bf16 widened to fp32: the bits shifted up (exact). */
static inline __m512 bf16x16_to_f32(const bf16 *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 fp32 narrowed to bf16 as f32_to_bf16 does each: to nearest, ties to even, NaN quiet. */
static inline __m256i f32x16_to_bf16(__m512 v)
{
    const __m512i u = _mm512_castps_si512(v);
    const __m512i rounded = _mm512_add_epi32(
        u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    const __m512i out = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x400000)); /* NaN: its bits, quieted */
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(out, 16));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The first n (< 16) of 16 bf16 widened to fp32, the rest 0; reads only those n. */
static inline __m512 bf16x16_to_f32_tail(const bf16 *p, int n)
{
    const __m256i v = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), (const void *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#endif

#endif
