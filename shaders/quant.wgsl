// Decoders for the GGUF weight formats, shared by the kernels that read
// quantized weights (matmul.wgsl, embed.wgsl).
//
// The including shader declares the weights as
//     var<storage, read> wq: array<u32>;
// holding rows in their GGUF block layout, back to back (row r at byte
// r * row_bytes). Blocks are not 4-byte aligned in general (Q4_0 is 18 bytes,
// Q6_K 210, an F16 row of odd length ends mid-word), so every field is read
// at a byte offset by combining the words around it (little-endian).
//
// Every format has one function
//     fn dq8_<fmt>(row_byte: u32, k: u32) -> array<f32, 8>
// giving weights k .. k+8 of the row that starts at byte `row_byte`, with k a
// multiple of 8. The block formats need k + 8 <= the row length (rows are
// whole blocks); F32/F16/BF16 read past the row's end when the row length is
// not a multiple of 8, and the caller discards those values.
//
// The arithmetic is the CPU decoders' (src/quant/legacy.rs, kquants.rs):
// scales from f16 through unpack2x16float (no `enable f16` needed), bf16 by
// a shift into the top half of an f32.

// ---- reading at byte offsets -------------------------------------------

// The 32 bits starting at byte `b` (any alignment).
fn wq_u32(b: u32) -> u32 {
    let i = b >> 2u;
    let s = (b & 3u) * 8u;
    let lo = wq[i];
    if (s == 0u) {
        return lo;
    }
    return (lo >> s) | (wq[i + 1u] << (32u - s));
}

// The 16 bits starting at byte `b` (any alignment).
fn wq_u16(b: u32) -> u32 {
    let s = (b & 3u) * 8u;
    if (s == 24u) {
        return wq_u32(b) & 0xffffu;
    }
    return (wq[b >> 2u] >> s) & 0xffffu;
}

// The f16 at byte `b`, as f32.
fn wq_f16(b: u32) -> f32 {
    return unpack2x16float(wq_u16(b)).x;
}

// The byte at `b`.
fn wq_u8(b: u32) -> u32 {
    return (wq[b >> 2u] >> ((b & 3u) * 8u)) & 0xffu;
}

// The 8 bytes at `b` as two words (byte i of the run is byte i % 4 of word i / 4).
fn wq_8bytes(b: u32) -> vec2<u32> {
    return vec2<u32>(wq_u32(b), wq_u32(b + 4u));
}

// The low (`hi` false) or high nibbles of 8 bytes, one per byte.
fn nibbles(q: vec2<u32>, hi: bool) -> vec2<u32> {
    return (q >> vec2<u32>(select(0u, 4u, hi))) & vec2<u32>(0x0f0f0f0fu);
}

// The bytes of a word as 4 floats (unsigned, signed).
fn u8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8(w));
}
fn i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xI8(w));
}

// Bits j .. j+4 of `h`, one per lane, moved to bit 4 (the fifth quant bit).
fn bit4x4(h: u32, j: u32) -> vec4<u32> {
    return ((vec4<u32>(h >> j) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) << vec4<u32>(4u);
}

fn arr8(a: vec4<f32>, b: vec4<f32>) -> array<f32, 8> {
    return array<f32, 8>(a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w);
}

// ---- float formats -----------------------------------------------------

fn dq8_f32(row_byte: u32, k: u32) -> array<f32, 8> {
    // F32 rows are 4-byte aligned.
    let i = (row_byte >> 2u) + k;
    return array<f32, 8>(
        bitcast<f32>(wq[i]), bitcast<f32>(wq[i + 1u]),
        bitcast<f32>(wq[i + 2u]), bitcast<f32>(wq[i + 3u]),
        bitcast<f32>(wq[i + 4u]), bitcast<f32>(wq[i + 5u]),
        bitcast<f32>(wq[i + 6u]), bitcast<f32>(wq[i + 7u]),
    );
}

fn dq8_f16(row_byte: u32, k: u32) -> array<f32, 8> {
    let b = row_byte + 2u * k;
    let v0 = unpack2x16float(wq_u32(b));
    let v1 = unpack2x16float(wq_u32(b + 4u));
    let v2 = unpack2x16float(wq_u32(b + 8u));
    let v3 = unpack2x16float(wq_u32(b + 12u));
    return array<f32, 8>(v0.x, v0.y, v1.x, v1.y, v2.x, v2.y, v3.x, v3.y);
}

fn bf16_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn dq8_bf16(row_byte: u32, k: u32) -> array<f32, 8> {
    let b = row_byte + 2u * k;
    let v0 = bf16_pair(wq_u32(b));
    let v1 = bf16_pair(wq_u32(b + 4u));
    let v2 = bf16_pair(wq_u32(b + 8u));
    let v3 = bf16_pair(wq_u32(b + 12u));
    return array<f32, 8>(v0.x, v0.y, v1.x, v1.y, v2.x, v2.y, v3.x, v3.y);
}

// ---- legacy 32-value blocks ------------------------------------------------
// In a block, byte j of `qs` holds weight j (low nibble) and weight j + 16
// (high nibble); weights j .. j+8 (j = k % 32) are the low nibbles of
// qs[j .. j+8] for j < 16, else the high nibbles of qs[j-16 .. j-8].

// Q4_0, 18 bytes: f16 d, qs[16]; d·(q − 8).
fn dq8_q4_0(row_byte: u32, k: u32) -> array<f32, 8> {
    let blk = row_byte + (k >> 5u) * 18u;
    let j = k & 31u;
    let d = wq_f16(blk);
    let q = nibbles(wq_8bytes(blk + 2u + (j & 15u)), j >= 16u);
    return arr8((u8x4(q.x) - 8.0) * d, (u8x4(q.y) - 8.0) * d);
}

// Q4_1, 20 bytes: f16 d, f16 m, qs[16]; d·q + m.
fn dq8_q4_1(row_byte: u32, k: u32) -> array<f32, 8> {
    let blk = row_byte + (k >> 5u) * 20u;
    let j = k & 31u;
    let dm = unpack2x16float(wq_u32(blk));
    let q = nibbles(wq_8bytes(blk + 4u + (j & 15u)), j >= 16u);
    return arr8(u8x4(q.x) * dm.x + dm.y, u8x4(q.y) * dm.x + dm.y);
}

// Q5_0, 22 bytes: f16 d, u32 qh, qs[16]; bit i of qh is bit 4 of weight i;
// d·(q − 16).
fn dq8_q5_0(row_byte: u32, k: u32) -> array<f32, 8> {
    let blk = row_byte + (k >> 5u) * 22u;
    let j = k & 31u;
    let d = wq_f16(blk);
    let qh = wq_u32(blk + 2u);
    let q = nibbles(wq_8bytes(blk + 6u + (j & 15u)), j >= 16u);
    let a = vec4<f32>(unpack4xU8(q.x) | bit4x4(qh, j)) - 16.0;
    let b = vec4<f32>(unpack4xU8(q.y) | bit4x4(qh, j + 4u)) - 16.0;
    return arr8(a * d, b * d);
}

// Q5_1, 24 bytes: f16 d, f16 m, u32 qh, qs[16]; d·q + m.
fn dq8_q5_1(row_byte: u32, k: u32) -> array<f32, 8> {
    let blk = row_byte + (k >> 5u) * 24u;
    let j = k & 31u;
    let dm = unpack2x16float(wq_u32(blk));
    let qh = wq_u32(blk + 4u);
    let q = nibbles(wq_8bytes(blk + 8u + (j & 15u)), j >= 16u);
    let a = vec4<f32>(unpack4xU8(q.x) | bit4x4(qh, j));
    let b = vec4<f32>(unpack4xU8(q.y) | bit4x4(qh, j + 4u));
    return arr8(a * dm.x + dm.y, b * dm.x + dm.y);
}

// Q8_0, 34 bytes: f16 d, i8 qs[32]; d·q.
fn dq8_q8_0(row_byte: u32, k: u32) -> array<f32, 8> {
    let blk = row_byte + (k >> 5u) * 34u;
    let d = wq_f16(blk);
    let q = wq_8bytes(blk + 2u + (k & 31u));
    return arr8(i8x4(q.x) * d, i8x4(q.y) * d);
}

// ---- k-quants (256-value super-blocks) -------------------------------------

// Scale (x) and min (y) of sub-block s (0..8) from the 12 packed bytes at `b`
// (ggml's get_scale_min_k4).
fn scale_min_k4(b: u32, s: u32) -> vec2<f32> {
    if (s < 4u) {
        return vec2<f32>(f32(wq_u8(b + s) & 63u), f32(wq_u8(b + s + 4u) & 63u));
    }
    let q = wq_u8(b + s + 4u);
    let sc = (q & 15u) | ((wq_u8(b + s - 4u) >> 6u) << 4u);
    let m = (q >> 4u) | ((wq_u8(b + s) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// Q4_K, 144 bytes: f16 d, f16 dmin, scales[12], qs[128]. Sub-block s
// (weights 32s .. 32s+32) is d·sc[s]·q − dmin·m[s], its nibbles the low
// (even s) or high (odd s) ones of qs[32·(s/2) ..].
fn dq8_q4_k(row_byte: u32, k: u32) -> array<f32, 8> {
    let blk = row_byte + (k >> 8u) * 144u;
    let i = k & 255u;
    let s = i >> 5u;
    let l = i & 31u;
    let dd = unpack2x16float(wq_u32(blk));
    let sm = scale_min_k4(blk + 4u, s);
    let d1 = dd.x * sm.x;
    let m1 = dd.y * sm.y;
    let q = nibbles(wq_8bytes(blk + 16u + 32u * (s >> 1u) + l), (s & 1u) == 1u);
    return arr8(d1 * u8x4(q.x) - m1, d1 * u8x4(q.y) - m1);
}

// Q5_K, 176 bytes: f16 d, f16 dmin, scales[12], qh[32], qs[128]; as Q4_K,
// with bit 4 of weight 32s + l in bit s of qh[l].
fn dq8_q5_k(row_byte: u32, k: u32) -> array<f32, 8> {
    let blk = row_byte + (k >> 8u) * 176u;
    let i = k & 255u;
    let s = i >> 5u;
    let l = i & 31u;
    let dd = unpack2x16float(wq_u32(blk));
    let sm = scale_min_k4(blk + 4u, s);
    let d1 = dd.x * sm.x;
    let m1 = dd.y * sm.y;
    let q = nibbles(wq_8bytes(blk + 48u + 32u * (s >> 1u) + l), (s & 1u) == 1u);
    let h = (wq_8bytes(blk + 16u + l) >> vec2<u32>(s)) & vec2<u32>(0x01010101u);
    let a = vec4<f32>(unpack4xU8(q.x | (h.x << 4u)));
    let b = vec4<f32>(unpack4xU8(q.y | (h.y << 4u)));
    return arr8(d1 * a - m1, d1 * b - m1);
}

// Q6_K, 210 bytes: ql[128], qh[64], i8 scales[16], f16 d. Weight
// 128h + 32c + l (c = 0..4, l < 32) has low bits in ql[64h + l + 32·(c&1)]
// (low nibble for c < 2, else high), high bits 2c.. of qh[32h + l], scale
// scales[8h + 2c + l/16]; it decodes as d·scale·(q − 32).
fn dq8_q6_k(row_byte: u32, k: u32) -> array<f32, 8> {
    let blk = row_byte + (k >> 8u) * 210u;
    let i = k & 255u;
    let h = i >> 7u;
    let c = (i >> 5u) & 3u;
    let l = i & 31u;
    let d = wq_f16(blk + 208u);
    let sc = f32(extractBits(bitcast<i32>(wq_u8(blk + 192u + (i >> 4u))), 0u, 8u));
    let ds = d * sc;
    let ql = nibbles(wq_8bytes(blk + 64u * h + 32u * (c & 1u) + l), c >= 2u);
    let qh = (wq_8bytes(blk + 128u + 32u * h + l) >> vec2<u32>(2u * c)) & vec2<u32>(0x03030303u);
    let a = vec4<f32>(unpack4xU8(ql.x | (qh.x << 4u))) - 32.0;
    let b = vec4<f32>(unpack4xU8(ql.y | (qh.y << 4u))) - 32.0;
    return arr8(ds * a, ds * b);
}
