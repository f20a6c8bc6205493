//! Decoders for the 256-value k-quant super-blocks (Q4_K, Q5_K, Q6_K).
//!
//! The float operations are ggml's: the sub-block scale is `d·sc` (and the
//! offset `dmin·m`) rounded to f32 first, then `scale·q − offset`, unfused.

use super::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, QK_K, scales_mins_k4};
use super::simd::Isa;

/// Q4_K: sub-block `s` is `d·sc[s]·q − dmin·m[s]`.
#[inline(always)]
pub(crate) fn decode_q4_k<I: Isa>(isa: I, b: &BlockQ4K, y: &mut [f32; QK_K]) {
    let d = isa.f16(b.d);
    let dmin = isa.f16(b.dmin);
    let (sc, m) = scales_mins_k4(&b.scales);
    for p in 0..4 {
        let q: &[u8; 32] = b.qs[32 * p..32 * p + 32].try_into().expect("32 bytes");
        let (d1, m1) = (d * sc[2 * p] as f32, dmin * m[2 * p] as f32);
        let (d2, m2) = (d * sc[2 * p + 1] as f32, dmin * m[2 * p + 1] as f32);
        let (lo, hi) = y[64 * p..64 * p + 64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (q[l] & 0xF) as f32 - m1;
            hi[l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: as Q4_K with a fifth bit from `qh`.
#[inline(always)]
pub(crate) fn decode_q5_k<I: Isa>(isa: I, b: &BlockQ5K, y: &mut [f32; QK_K]) {
    let d = isa.f16(b.d);
    let dmin = isa.f16(b.dmin);
    let (sc, m) = scales_mins_k4(&b.scales);
    for p in 0..4 {
        let q: &[u8; 32] = b.qs[32 * p..32 * p + 32].try_into().expect("32 bytes");
        let (d1, m1) = (d * sc[2 * p] as f32, dmin * m[2 * p] as f32);
        let (d2, m2) = (d * sc[2 * p + 1] as f32, dmin * m[2 * p + 1] as f32);
        let (lo, hi) = y[64 * p..64 * p + 64].split_at_mut(32);
        for l in 0..32 {
            let h = b.qh[l] >> (2 * p);
            let q1 = (q[l] & 0xF) | ((h & 1) << 4);
            let q2 = (q[l] >> 4) | ((h & 2) << 3);
            lo[l] = d1 * q1 as f32 - m1;
            hi[l] = d2 * q2 as f32 - m2;
        }
    }
}

/// Q6_K: weight `i` is `d·scales[i/16]·(q − 32)`.
#[inline(always)]
pub(crate) fn decode_q6_k<I: Isa>(isa: I, b: &BlockQ6K, y: &mut [f32; QK_K]) {
    let d = isa.f16(b.d);
    let ds: [f32; 16] = std::array::from_fn(|i| d * b.scales[i] as f32);
    for h in 0..2 {
        let ql = &b.ql[64 * h..64 * h + 64];
        let qh = &b.qh[32 * h..32 * h + 32];
        let y = &mut y[128 * h..128 * h + 128];
        for half in 0..2 {
            let is = 8 * h + half;
            for l in 16 * half..16 * half + 16 {
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) << 4)) as i32 - 32;
                y[l] = ds[is] * q1 as f32;
                y[l + 32] = ds[is + 2] * q2 as f32;
                y[l + 64] = ds[is + 4] * q3 as f32;
                y[l + 96] = ds[is + 6] * q4 as f32;
            }
        }
    }
}
