"""The one codec loop inductor cannot fuse, in C: the log-binned |x| histogram (counts and sums per bin).

A histogram is a scatter-add into 226 bins. Inductor has no such primitive (``torch.bincount`` is a serial loop
over a materialised index tensor, 0.11-0.16x a memory copy), so this module compiles a small C file with the
machine's C compiler (the one inductor uses too), loads it with :mod:`ctypes` (calls release the GIL) and runs it
with OpenMP at torch's thread count. It is built once per machine and cached under ``$TAILQ_CACHE_DIR`` (default
``$XDG_CACHE_HOME/tailq`` or ``~/.cache/tailq``), keyed by the source, the compiler and the flags. No compiler, a
failed build or ``TAILQ_NATIVE=0``: :func:`library` returns ``None`` and the caller keeps its torch path.

The kernel reads the float's bits (no logarithm), exactly as :func:`tailq.kernels.cpu.bins_from_bits`: biased
exponent ``e``, mantissa ``m``; at octave shift ``s`` the bin of ``|x|·2^-s`` is ``0`` when ``e - s < 87``
(below 2^-40), ``225`` from ``e - s >= 143`` (2^16) on, else ``4(e - s) - 347 + sub`` with ``sub`` the number of
quarter-octave mantissa thresholds ``m`` reaches. Per bin it adds the 24-bit significand ``m | 2^23`` as an
integer. Every value of a regular bin has the same exponent, so the bin's exact sum is that integer times
``2^(e - s - 150)``: the reference's float64 sum, which is exact in any order for the same reason (fewer than
2^29 values per call keeps the integer, and so the float64 sum, below 2^53). The two mixed-exponent bins (zero
and overflow) report only whether they are occupied; the caller recomputes those sums in the reference's order.

Per element the loop does one 64-bit add: count and significand are packed in one word (``2^43 + sig``), each of
four interleaved sub-histograms per thread (so consecutive values of one bin do not wait on each other's store)
is flushed every 2^19 elements, before its 43-bit significand field could carry into the count.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["MAX_NUMEL", "NBINS", "available", "decode_dense", "encode_dense", "histogram_bits", "library",
           "nonfinite_count", "why_unavailable"]

log = logging.getLogger("tailq.kernels")

NBINS = 226  # HIST_K + 2 (checked against the theory constants by the caller)
MAX_NUMEL = 1 << 29  # values per call: keeps every bin's significand sum below 2^53 (exact as float64)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <omp.h>
#include <math.h>

#if defined(__x86_64__) && !defined(TQ_NO_CLONES)
/* one build, the CPU's best variant picked at load time (AVX-512, AVX2, baseline) */
#define TQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define TQ_CLONES
#endif

#define NB 226
#define OVER 225
#define SUBS 4
#define BLOCK 1024
#define FLUSH (1 << 19)
#define CSHIFT 43

/* Bin and packed increment of BLOCK values: a branch-free loop the compiler vectorizes (AVX2 when the CPU has
   it, through target_clones), kept in L1 for the scatter loop that follows. */
TQ_CLONES
static void bins_block(const uint32_t *restrict x, int64_t k, int shift, uint32_t t1, uint32_t t2, uint32_t t3,
                       int32_t *restrict idx, uint64_t *restrict inc, int64_t *restrict bad) {
    int64_t nbad = 0;
    for (int64_t i = 0; i < k; i++) {
        uint32_t a = x[i] & 0x7FFFFFFFu;
        int32_t e = (int32_t)(a >> 23);
        uint32_t m = a & 0x7FFFFFu;
        int32_t es = e - shift;
        int32_t sub = (int32_t)(m >= t1) + (int32_t)(m >= t2) + (int32_t)(m >= t3);
        int32_t b = 4 * es - 347 + sub;
        b = b > OVER ? OVER : b;
        idx[i] = es < 87 ? 0 : b;
        nbad += (e == 255);
        inc[i] = ((uint64_t)1 << CSHIFT) | (uint64_t)(m | (e ? 0x800000u : 0u));
    }
    *bad += nbad;
}

/* number of NaN/Inf (exponent bits all ones) */
TQ_CLONES
static int64_t nonfinite_block(const uint32_t *restrict x, int64_t k) {
    int64_t c = 0;
    for (int64_t i = 0; i < k; i++) c += (x[i] & 0x7F800000u) == 0x7F800000u;
    return c;
}

int64_t tailq_nonfinite_f32(const uint32_t *x, int64_t n, int nthreads) {
    int64_t total = 0, blocks = (n + 65535) / 65536;
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel for num_threads(nthreads) reduction(+:total) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t lo = b * 65536;
        total += nonfinite_block(x + lo, n - lo < 65536 ? n - lo : 65536);
    }
    return total;
}

/* ---- stochastic rounding + dense packing (RoundSpec arithmetic, tailq.kernels.spec) ------------------- */

static inline uint32_t lowbias32(uint32_t v) {
    v ^= v >> 16; v *= 0x7feb352du; v ^= v >> 15; v *= 0x846ca68bu; v ^= v >> 16;
    return v;
}

/* Codes 0..s of k values starting at element index i0: affine (uniform codebooks) or a count over the levels. */
TQ_CLONES
static void codes_affine(const float *restrict x, int64_t k, uint32_t i0, uint32_t k0, uint32_t k1, float low,
                         float inv, float smax, float smax1, int32_t *restrict out) {
    for (int64_t i = 0; i < k; i++) {
        uint32_t h = lowbias32(lowbias32(((uint32_t)i + i0) ^ k0) ^ k1);
        float u = (float)(int32_t)(h >> 8) * (1.0f / 16777216.0f);
        float t = (x[i] - low) * inv;
        t = t < 0.0f ? 0.0f : t;
        t = t > smax ? smax : t;
        float j = floorf(t);
        j = j > smax1 ? smax1 : j;
        out[i] = (int32_t)j + (u < t - j);
    }
}

#define CODES_CHAIN(NAME, SIZE)                                                                                \
TQ_CLONES                                                              \
static void NAME(const float *restrict x, int64_t k, uint32_t i0, uint32_t k0, uint32_t k1,                    \
                 const float *restrict search, const float *restrict wsearch, float lmin, float lmax,          \
                 float w0, int32_t *restrict out) {                                                            \
    float S[SIZE], W[SIZE];                                                                                    \
    for (int q = 0; q < SIZE; q++) { S[q] = search[q]; W[q] = wsearch[q]; }                                    \
    for (int64_t i = 0; i < k; i++) {                                                                          \
        uint32_t h = lowbias32(lowbias32(((uint32_t)i + i0) ^ k0) ^ k1);                                       \
        float u = (float)(int32_t)(h >> 8) * (1.0f / 16777216.0f);                                             \
        float xt = x[i] < lmax ? x[i] : lmax;                                                                  \
        xt = xt > lmin ? xt : lmin;                                                                            \
        float lo = lmin, w = w0;                                                                               \
        int32_t j = 0;                                                                                         \
        _Pragma("GCC unroll 32")                                                                               \
        for (int q = 1; q < SIZE - 1; q++) {                                                                   \
            int ge = xt >= S[q];                                                                               \
            lo = ge ? S[q] : lo;                                                                               \
            w = ge ? W[q] : w;                                                                                 \
            j += ge;                                                                                           \
        }                                                                                                      \
        out[i] = j + ((u * w) < (xt - lo));                                                                    \
    }                                                                                                          \
}
/* search[q] = l_q for 1 <= q <= s - 1 and +inf beyond (so j <= s - 1), wsearch[q] = w_q: the compiled path's
   padded tables; j = #{q : xt >= l_q}, with lo = l_j and w = w_j selected along the way */
CODES_CHAIN(codes_chain8, 8)
CODES_CHAIN(codes_chain16, 16)
CODES_CHAIN(codes_chain32, 32)

/* tab = [search(256): l_q for 1 <= q <= s - 1, +inf beyond | levels (s + 1, padded to 256) | widths (s, padded)]:
   a branchless binary search (8 steps, vectorized with gathers), j = #{q : xt >= l_q} */
TQ_CLONES
static void codes_bs8(const float *restrict x, int64_t k, uint32_t i0, uint32_t k0, uint32_t k1,
                      const float *restrict tab, int s, int32_t *restrict out) {
    const float *search = tab, *levels = tab + 256, *widths = tab + 512;
    float lmin = levels[0], lmax = levels[s];
    for (int64_t i = 0; i < k; i++) {
        uint32_t h = lowbias32(lowbias32(((uint32_t)i + i0) ^ k0) ^ k1);
        float u = (float)(int32_t)(h >> 8) * (1.0f / 16777216.0f);
        float xt = x[i] < lmax ? x[i] : lmax;
        xt = xt > lmin ? xt : lmin;
        int32_t j = 0;
        j = xt >= search[j + 128] ? j + 128 : j;
        j = xt >= search[j + 64] ? j + 64 : j;
        j = xt >= search[j + 32] ? j + 32 : j;
        j = xt >= search[j + 16] ? j + 16 : j;
        j = xt >= search[j + 8] ? j + 8 : j;
        j = xt >= search[j + 4] ? j + 4 : j;
        j = xt >= search[j + 2] ? j + 2 : j;
        j = xt >= search[j + 1] ? j + 1 : j;
        out[i] = j + ((u * widths[j]) < (xt - levels[j]));
    }
}

/* codes c[0..k) (< 2^BITS) -> ceil(k*BITS/8) bytes at out, little-endian, and no more (k a multiple of 8 except
   in the last block) */
#define PACK_BITS(BITS)                                                                                          \
static void pack_##BITS(const int32_t *restrict c, int64_t k, uint8_t *restrict out) {                           \
    int64_t nbytes = (k * BITS + 7) / 8;                                                                         \
    for (int64_t g = 0; 8 * g < k; g++) {                                                                        \
        int64_t rest = k - 8 * g < 8 ? k - 8 * g : 8;                                                            \
        const int32_t *cg = c + 8 * g;                                                                           \
        uint64_t t = 0;                                                                                          \
        if (rest == 8) for (int q = 0; q < 8; q++) t |= (uint64_t)(uint32_t)cg[q] << (q * BITS);                 \
        else for (int q = 0; q < rest; q++) t |= (uint64_t)(uint32_t)cg[q] << (q * BITS);                        \
        if (g * BITS + 8 <= nbytes) memcpy(out + g * BITS, &t, 8); /* spare bytes: the next group's */           \
        else memcpy(out + g * BITS, &t, (size_t)((rest * BITS + 7) / 8));                                         \
    }                                                                                                            \
}
PACK_BITS(1) PACK_BITS(2) PACK_BITS(3) PACK_BITS(4) PACK_BITS(5) PACK_BITS(6) PACK_BITS(7)

static void pack_block(const int32_t *restrict c, int64_t k, int bits, uint8_t *restrict out) {
    switch (bits) {
    case 1: pack_1(c, k, out); break;
    case 2: pack_2(c, k, out); break;
    case 3: pack_3(c, k, out); break;
    case 4: pack_4(c, k, out); break;
    case 5: pack_5(c, k, out); break;
    case 6: pack_6(c, k, out); break;
    case 7: pack_7(c, k, out); break;
    default: for (int64_t i = 0; i < k; i++) out[i] = (uint8_t)c[i];
    }
}

#define EBLOCK 4096
/* mode 0 affine (p = {low, inv, smax, smax1}); 1 / 3 / 4: chain over 8 / 16 / 32 padded entries (t1 = search,
   t2 = wsearch, p = {lmin, lmax, w0}); 2: binary search (t1 = the 768-entry table of codes_bs8; s_or_nk = s).
   bits 1..8; out has ceil(n*bits/8) bytes. */
int tailq_encode_dense(const float *x, int64_t n, uint32_t k0, uint32_t k1, int mode, const float *p,
                       const float *t1, const float *t2, int s_or_nk, int bits, int nthreads, uint8_t *out) {
    int64_t blocks = (n + EBLOCK - 1) / EBLOCK;
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int32_t codes[EBLOCK];
        int64_t lo = b * EBLOCK, k = n - lo < EBLOCK ? n - lo : EBLOCK;
        if (mode == 0) codes_affine(x + lo, k, (uint32_t)lo, k0, k1, p[0], p[1], p[2], p[3], codes);
        else if (mode == 1) codes_chain8(x + lo, k, (uint32_t)lo, k0, k1, t1, t2, p[0], p[1], p[2], codes);
        else if (mode == 3) codes_chain16(x + lo, k, (uint32_t)lo, k0, k1, t1, t2, p[0], p[1], p[2], codes);
        else if (mode == 4) codes_chain32(x + lo, k, (uint32_t)lo, k0, k1, t1, t2, p[0], p[1], p[2], codes);
        else codes_bs8(x + lo, k, (uint32_t)lo, k0, k1, t1, s_or_nk, codes);
        pack_block(codes, k, bits, out + lo / 8 * bits);
    }
    return 0;
}

/* ---- unpack + decode (table lookup) ---------------------------------------------------------------------- */

/* out[i] = tbl[code i] (acc = 0: store; acc = 1: add to out) for k codes of BITS bits starting at byte in[0]
   (k a multiple of 8 except in the last block; the input holds exactly ceil(k*BITS/8) bytes from in) */
#define DECODE_BITS(BITS)                                                                                        \
static void dec_##BITS(const uint8_t *restrict in, int64_t k, const float *restrict tbl, int acc,                \
                       float *restrict o) {                                                                      \
    const uint64_t m = ((uint64_t)1 << BITS) - 1;                                                                \
    int64_t nbytes = (k * BITS + 7) / 8;                                                                         \
    for (int64_t g = 0; 8 * g < k; g++) {                                                                        \
        uint64_t t = 0;                                                                                          \
        int64_t rest = k - 8 * g < 8 ? k - 8 * g : 8;                                                            \
        if (g * BITS + 8 <= nbytes) memcpy(&t, in + g * BITS, 8);                                                \
        else memcpy(&t, in + g * BITS, (size_t)((rest * BITS + 7) / 8));                                         \
        float *d = o + 8 * g;                                                                                    \
        if (rest == 8) {                                                                                         \
            if (acc) for (int q = 0; q < 8; q++) d[q] = d[q] + tbl[(t >> (q * BITS)) & m];                       \
            else for (int q = 0; q < 8; q++) d[q] = tbl[(t >> (q * BITS)) & m];                                  \
        } else {                                                                                                 \
            if (acc) for (int q = 0; q < rest; q++) d[q] = d[q] + tbl[(t >> (q * BITS)) & m];                    \
            else for (int q = 0; q < rest; q++) d[q] = tbl[(t >> (q * BITS)) & m];                               \
        }                                                                                                        \
    }                                                                                                            \
}
DECODE_BITS(1) DECODE_BITS(2) DECODE_BITS(3) DECODE_BITS(4) DECODE_BITS(5) DECODE_BITS(6) DECODE_BITS(7)

static void dec_block(const uint8_t *restrict in, int64_t k, int bits, const float *restrict tbl, int acc,
                      float *restrict o) {
    switch (bits) {
    case 1: dec_1(in, k, tbl, acc, o); break;
    case 2: dec_2(in, k, tbl, acc, o); break;
    case 3: dec_3(in, k, tbl, acc, o); break;
    case 4: dec_4(in, k, tbl, acc, o); break;
    case 5: dec_5(in, k, tbl, acc, o); break;
    case 6: dec_6(in, k, tbl, acc, o); break;
    case 7: dec_7(in, k, tbl, acc, o); break;
    default:
        if (acc) for (int64_t i = 0; i < k; i++) o[i] = o[i] + tbl[in[i]];
        else for (int64_t i = 0; i < k; i++) o[i] = tbl[in[i]];
    }
}

/* out[i] = (sum over r of values[code_r(i)], added in order from 0.0f) / count when count > 1, else values[code] */
int tailq_decode_dense(const uint8_t *const *payloads, int count, int64_t n, int bits, const float *values,
                       int nvalues, int nthreads, float *out) {
    int64_t blocks = (n + EBLOCK - 1) / EBLOCK;
    if (nthreads < 1) nthreads = 1;
    float tbl[256];
    memset(tbl, 0, sizeof(tbl));
    memcpy(tbl, values, sizeof(float) * (size_t)(nvalues < 256 ? nvalues : 256));
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t lo = b * EBLOCK, k = n - lo < EBLOCK ? n - lo : EBLOCK;
        float *o = out + lo;
        if (count == 1) { dec_block(payloads[0] + lo / 8 * bits, k, bits, tbl, 0, o); continue; }
        for (int64_t i = 0; i < k; i++) o[i] = 0.0f;
        for (int r = 0; r < count; r++) dec_block(payloads[r] + lo / 8 * bits, k, bits, tbl, 1, o);
        float c = (float)count;
        for (int64_t i = 0; i < k; i++) o[i] = o[i] / c;
    }
    return 0;
}

/* counts[NB], sums[NB] (significand sums; only regular bins are meaningful, plus sums[0] != 0 iff a
   non-zero value fell into the zero bin), flags[0] = number of NaN/Inf. */
int tailq_hist_f32(const uint32_t *x, int64_t n, int shift, uint32_t t1, uint32_t t2, uint32_t t3,
                   int nthreads, int64_t *counts, int64_t *sums, int64_t *flags) {
    memset(counts, 0, NB * sizeof(int64_t));
    memset(sums, 0, NB * sizeof(int64_t));
    int64_t bad_total = 0;
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads) reduction(+:bad_total)
    {
        uint64_t acc[SUBS][NB];
        int64_t c_loc[NB], s_loc[NB];
        int32_t idx[BLOCK];
        uint64_t inc[BLOCK];
        memset(acc, 0, sizeof(acc));
        memset(c_loc, 0, sizeof(c_loc));
        memset(s_loc, 0, sizeof(s_loc));
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t per = (n + nt - 1) / nt;
        per = (per + BLOCK - 1) / BLOCK * BLOCK;
        int64_t lo = (int64_t)t * per < n ? (int64_t)t * per : n;
        int64_t hi = lo + per < n ? lo + per : n;
        int64_t bad = 0, since_flush = 0;
        for (int64_t base = lo; base < hi; base += BLOCK) {
            int64_t k = hi - base < BLOCK ? hi - base : BLOCK;
            bins_block(x + base, k, shift, t1, t2, t3, idx, inc, &bad);
            int64_t i = 0;
            for (; i + SUBS <= k; i += SUBS) {
                acc[0][idx[i]] += inc[i];
                acc[1][idx[i + 1]] += inc[i + 1];
                acc[2][idx[i + 2]] += inc[i + 2];
                acc[3][idx[i + 3]] += inc[i + 3];
            }
            for (; i < k; i++) acc[0][idx[i]] += inc[i];
            since_flush += BLOCK;
            if (since_flush >= (int64_t)FLUSH * SUBS - BLOCK * SUBS || base + BLOCK >= hi) {
                for (int s = 0; s < SUBS; s++)
                    for (int b = 0; b < NB; b++) {
                        uint64_t v = acc[s][b];
                        c_loc[b] += (int64_t)(v >> CSHIFT);
                        s_loc[b] += (int64_t)(v & (((uint64_t)1 << CSHIFT) - 1));
                        acc[s][b] = 0;
                    }
                since_flush = 0;
            }
        }
        bad_total += bad;
        #pragma omp critical
        for (int b = 0; b < NB; b++) { counts[b] += c_loc[b]; sums[b] += s_loc[b]; }
    }
    flags[0] = bad_total;
    return 0;
}
"""

_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off", "-fno-math-errno",
          "-fno-trapping-math"]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get("TAILQ_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tailq"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    tag = hashlib.sha256("\0".join([_SOURCE, cc, *_FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    out = _cache_dir() / "native" / f"tailq_native_{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / "tailq_native.c"
            src.write_text(_SOURCE)
            lib = Path(tmp) / out.name
            res = subprocess.run([cc, *_FLAGS, str(src), "-o", str(lib)], capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
            if res.returncode != 0:  # an older compiler without these target_clones: one baseline build
                res = subprocess.run([cc, *_FLAGS, "-DTQ_NO_CLONES", str(src), "-o", str(lib)], capture_output=True,
                                     text=True, timeout=120)  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:500]}")
            os.replace(lib, out)  # atomic: concurrent builders (ranks starting together) never see a partial file
    so = ctypes.CDLL(str(out))
    fn = so.tailq_hist_f32
    i64p = ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32,
                   ctypes.c_uint32, ctypes.c_int, i64p, i64p, i64p]  # fmt: skip
    fn.restype = ctypes.c_int
    vp, i32, i64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint32
    so.tailq_encode_dense.argtypes = [vp, i64, u32, u32, i32, vp, vp, vp, i32, i32, i32, vp]
    so.tailq_encode_dense.restype = ctypes.c_int
    so.tailq_decode_dense.argtypes = [vp, i32, i64, i32, vp, i32, i32, vp]
    so.tailq_decode_dense.restype = ctypes.c_int
    so.tailq_nonfinite_f32.argtypes = [vp, i64, i32]
    so.tailq_nonfinite_f32.restype = ctypes.c_int64
    return so


def library() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or ``None`` when it cannot be built or is switched off."""
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")  # type: ignore[return-value]
        if os.environ.get("TAILQ_NATIVE", "1").strip() == "0":
            _state["error"] = "switched off by TAILQ_NATIVE=0"
            return None
        try:
            _state["lib"] = _build()
        except Exception as err:  # noqa: BLE001 - any build failure means: keep the torch path
            _state["error"] = f"{type(err).__name__}: {err}"
            log.warning("tailq.kernels: the native histogram could not be built (%s); using the torch path "
                        "(same results, slower)", _state["error"])  # fmt: skip
            return None
        return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the native histogram runs in this process."""
    return library() is not None


def why_unavailable() -> str | None:
    """Why :func:`library` returned ``None`` (after a call), else ``None``."""
    return _state.get("error")  # type: ignore[return-value]


def histogram_bits(x: torch.Tensor, shift: int, thresholds: tuple[int, int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """``(counts, significand sums, non-finite count)`` of a contiguous CPU float32 tensor (see the module
    docstring); ``counts``/``sums`` are int64 tensors of :data:`NBINS` entries."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native histogram unavailable: {why_unavailable()}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError("histogram_bits: x must be a contiguous CPU float32 tensor")
    n = x.numel()
    if n > MAX_NUMEL:
        raise ValueError(f"histogram_bits: at most {MAX_NUMEL} values per call; got {n}")
    counts = torch.zeros(NBINS, dtype=torch.int64)
    sums = torch.zeros(NBINS, dtype=torch.int64)
    flags = torch.zeros(1, dtype=torch.int64)
    i64p = ctypes.POINTER(ctypes.c_int64)
    t1, t2, t3 = thresholds
    lib.tailq_hist_f32(
        x.data_ptr(), n, int(shift), t1, t2, t3, torch.get_num_threads(),
        ctypes.cast(counts.data_ptr(), i64p), ctypes.cast(sums.data_ptr(), i64p), ctypes.cast(flags.data_ptr(), i64p),
    )  # fmt: skip
    return counts, sums, int(flags[0])


ENCODE_MODES = {"affine": 0, "chain8": 1, "bs8": 2, "chain16": 3, "chain32": 4}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cpu_f32(t: torch.Tensor | None, name: str) -> None:
    if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()):
        raise ValueError(f"native: {name} must be a contiguous CPU float32 tensor")


def encode_dense(x: torch.Tensor, words: tuple[int, int], mode: str, params: torch.Tensor,
                 table1: torch.Tensor | None, table2: torch.Tensor | None, s: int, bits: int) -> torch.Tensor:
    """Stochastic rounding of ``x`` (element ``i`` uses the counter uniform of index ``i`` under key ``words``) and
    dense packing at ``bits`` in one pass: the bytes of ``pack_bits(codes, bits)``. ``mode`` and the tables are
    those of :func:`tailq.kernels.cpu.round_mode` / ``_params`` (see the C source)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {why_unavailable()}")
    for t, name in ((x, "x"), (params, "params"), (table1, "table1"), (table2, "table2")):
        _cpu_f32(t, name)
    if not 1 <= bits <= 8:
        raise ValueError(f"native.encode_dense: bits must be in 1..8; got {bits}")
    n = x.numel()
    if n >= 1 << 32:
        raise ValueError("native.encode_dense: at most 2^32 - 1 values (32-bit counters)")
    out = torch.empty((n * bits + 7) // 8, dtype=torch.uint8)
    if n:
        lib.tailq_encode_dense(x.data_ptr(), n, words[0], words[1], ENCODE_MODES[mode], params.data_ptr(),
                               _ptr(table1), _ptr(table2), int(s), int(bits), torch.get_num_threads(),
                               out.data_ptr())  # fmt: skip
    return out


def decode_dense(payloads: list[torch.Tensor], bits: int, n: int, values: torch.Tensor, out: torch.Tensor
                 ) -> torch.Tensor:  # fmt: skip
    """``out = values[unpack(p)]`` for one payload, or the mean over several (added in order from 0.0f, then
    divided by their count in float32: the reference's arithmetic)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {why_unavailable()}")
    _cpu_f32(values, "values")
    _cpu_f32(out, "out")
    nbytes = (n * bits + 7) // 8
    for p in payloads:
        if p.dtype != torch.uint8 or p.device.type != "cpu" or not p.is_contiguous() or p.numel() != nbytes:
            raise ValueError(f"native.decode_dense: payloads must be contiguous CPU uint8 tensors of {nbytes} bytes")
    if out.numel() != n:
        raise ValueError(f"native.decode_dense: out must have {n} elements; got {out.numel()}")
    if n:
        ptrs = (ctypes.c_void_p * len(payloads))(*[p.data_ptr() for p in payloads])
        lib.tailq_decode_dense(ptrs, len(payloads), n, int(bits), values.data_ptr(), values.numel(),
                               torch.get_num_threads(), out.data_ptr())  # fmt: skip
    return out


def nonfinite_count(x: torch.Tensor) -> int:
    """Number of NaN/Inf entries of a contiguous CPU float32 tensor (one vectorized pass over the exponent bits)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {why_unavailable()}")
    _cpu_f32(x, "x")
    return int(lib.tailq_nonfinite_f32(x.data_ptr(), x.numel(), torch.get_num_threads())) if x.numel() else 0
