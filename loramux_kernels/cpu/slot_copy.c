/* Writing an adapter into a device slot on the CPU: blocks of contiguous values copied,
 * each times its own scale (or 1), with streaming stores.
 *
 *   dst[b * dst_stride + i] = src[b * src_stride + i] * (scales ? scales[b] : 1)
 *   for b in [0, num_blocks), i in [0, count)
 *
 * A slot's buffers are cold in cache when a new adapter is written into them (16 slots of
 * ~20 MB each for the default model), so an ordinary store first reads every line it
 * writes; streaming stores skip that read, a third of the memory traffic of the write.
 * The products are those of torch.mul with an fp32 scale tensor: fp32 math, one rounding to
 * the buffer's dtype (bf16: to nearest, ties to even).
 */
#include <stdint.h>
#include <string.h>
#include "bf16.h"
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif

static void copy_block_f32(float *restrict dst, const float *restrict src, int64_t n, float scale, int scaled)
{
    int64_t i = 0;
#if HAVE_AVX512
    /* ordinary stores up to a 64-byte boundary, then whole lines streamed */
    for (; i < n && ((uintptr_t)(dst + i) & 63); i++) dst[i] = scaled ? src[i] * scale : src[i];
    const __m512 s = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(src + i);
        _mm512_stream_ps(dst + i, scaled ? _mm512_mul_ps(v, s) : v);
    }
#endif
    for (; i < n; i++) dst[i] = scaled ? src[i] * scale : src[i];
}


static void copy_block_bf16(bf16 *restrict dst, const bf16 *restrict src, int64_t n, float scale, int scaled)
{
    int64_t i = 0;
#if HAVE_AVX512
    for (; i < n && ((uintptr_t)(dst + i) & 63); i++)
        dst[i] = scaled ? f32_to_bf16(bf16_to_f32(src[i]) * scale) : src[i];
    const __m512 s = _mm512_set1_ps(scale);
    for (; i + 32 <= n; i += 32) {
        __m512i line;
        if (scaled) {
            const __m512 lo = _mm512_mul_ps(bf16x16_to_f32(src + i), s);
            const __m512 hi = _mm512_mul_ps(bf16x16_to_f32(src + i + 16), s);
            line = _mm512_inserti64x4(_mm512_castsi256_si512(f32x16_to_bf16(lo)), f32x16_to_bf16(hi), 1);
        } else {
            line = _mm512_loadu_si512((const void *)(src + i));
        }
        _mm512_stream_si512((void *)(dst + i), line);
    }
#endif
    for (; i < n; i++) dst[i] = scaled ? f32_to_bf16(bf16_to_f32(src[i]) * scale) : src[i];
}

/* element_size 4: fp32, 2: bf16. Returns 0, or -1 for another element size. */
int slot_copy(void *dst, int64_t dst_stride, const void *src, int64_t src_stride, int64_t count,
              int num_blocks, const float *scales, int element_size)
{
    if (element_size != 4 && element_size != 2) return -1;
    for (int b = 0; b < num_blocks; b++) {
        const float scale = scales ? scales[b] : 1.0f;
        if (element_size == 4)
            copy_block_f32((float *)dst + b * dst_stride, (const float *)src + b * src_stride, count, scale, scales != 0);
        else
            copy_block_bf16((bf16 *)dst + b * dst_stride, (const bf16 *)src + b * src_stride, count, scale, scales != 0);
    }
#if HAVE_AVX512
    _mm_sfence(); /* streamed lines are visible before the slot is published */
#endif
    return 0;
}
