//! Block layouts, declared once, in the field order of ggml's `ggml-common.h`.
//!
//! Every block is a `#[repr(C)]` struct of byte arrays: alignment 1, no padding,
//! every bit pattern valid, so a row's bytes are reinterpreted in place
//! ([`as_blocks`]) and the CPU and WGSL code read the same offsets
//! (`core::mem::offset_of!`). Half-precision fields are little-endian IEEE
//! binary16 bits. "Weight `i`" is the `i`-th decoded value of the block.

use super::GgmlType;

/// Values in a legacy block (Q4_0 … Q8_0).
pub const QK: usize = 32;
/// Values in a k-quant super-block (Q4_K, Q5_K, Q6_K).
pub const QK_K: usize = 256;

/// `block_q4_0`, 18 bytes: `y[i] = d·(q[i] − 8)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4_0 {
    /// Scale (f16).
    pub d: [u8; 2],
    /// Nibbles: low nibble of `qs[j]` is weight `j`, high nibble weight `j + 16`.
    pub qs: [u8; QK / 2],
}

/// `block_q4_1`, 20 bytes: `y[i] = d·q[i] + m`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4_1 {
    /// Scale (f16).
    pub d: [u8; 2],
    /// Offset (f16), the block minimum.
    pub m: [u8; 2],
    /// Nibbles, ordered as in [`BlockQ4_0`].
    pub qs: [u8; QK / 2],
}

/// `block_q5_0`, 22 bytes: `y[i] = d·(q[i] − 16)` with 5-bit `q`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5_0 {
    /// Scale (f16).
    pub d: [u8; 2],
    /// Fifth bits: bit `i` of this little-endian u32 is bit 4 of weight `i`.
    pub qh: [u8; 4],
    /// Low nibbles, ordered as in [`BlockQ4_0`].
    pub qs: [u8; QK / 2],
}

/// `block_q5_1`, 24 bytes: `y[i] = d·q[i] + m` with 5-bit `q`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5_1 {
    /// Scale (f16).
    pub d: [u8; 2],
    /// Offset (f16).
    pub m: [u8; 2],
    /// Fifth bits, as in [`BlockQ5_0`].
    pub qh: [u8; 4],
    /// Low nibbles, ordered as in [`BlockQ4_0`].
    pub qs: [u8; QK / 2],
}

/// `block_q8_0`, 34 bytes: `y[i] = d·qs[i]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8_0 {
    /// Scale (f16).
    pub d: [u8; 2],
    /// Signed quants.
    pub qs: [i8; QK],
}

/// `block_q4_K`, 144 bytes: 8 sub-blocks of 32 with 6-bit scale and min each.
///
/// Sub-block `s` (weights `32s .. 32s+32`) decodes as
/// `d·sc[s]·q − dmin·m[s]` ([`scale_min_k4`]); its nibbles are the low (even `s`)
/// or high (odd `s`) nibbles of `qs[32·(s/2) .. 32·(s/2)+32]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4K {
    /// Super-block scale of the scales (f16).
    pub d: [u8; 2],
    /// Super-block scale of the mins (f16).
    pub dmin: [u8; 2],
    /// Eight 6-bit scales and eight 6-bit mins, packed (see [`scale_min_k4`]).
    pub scales: [u8; 12],
    /// Nibbles.
    pub qs: [u8; QK_K / 2],
}

/// `block_q5_K`, 176 bytes: [`BlockQ4K`] plus a fifth bit per weight.
///
/// Bit 4 of weight `32s + l` is bit `s` of `qh[l]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5K {
    /// Super-block scale of the scales (f16).
    pub d: [u8; 2],
    /// Super-block scale of the mins (f16).
    pub dmin: [u8; 2],
    /// Packed 6-bit scales and mins, as in [`BlockQ4K`].
    pub scales: [u8; 12],
    /// Fifth bits.
    pub qh: [u8; QK_K / 8],
    /// Low nibbles, ordered as in [`BlockQ4K`].
    pub qs: [u8; QK_K / 2],
}

/// `block_q6_K`, 210 bytes: 16 sub-blocks of 16 with an 8-bit scale each.
///
/// In each half `h` (weights `128h .. 128h+128`), with `ql = ql[64h..]`,
/// `qh = qh[32h..]` and `l < 32`, the 6-bit quants are
/// weight `l`: `ql[l] & 15 | (qh[l] & 3) << 4`,
/// weight `l+32`: `ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4`,
/// weight `l+64`: `ql[l] >> 4 | (qh[l] >> 4 & 3) << 4`,
/// weight `l+96`: `ql[l+32] >> 4 | (qh[l] >> 6) << 4`;
/// weight `i` decodes as `d·scales[i/16]·(q − 32)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ6K {
    /// Low 4 bits of the quants.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits of the quants.
    pub qh: [u8; QK_K / 4],
    /// Signed sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale (f16).
    pub d: [u8; 2],
}

/// A block struct that may be read from (and written to) raw row bytes.
///
/// # Safety
/// Implementors are `#[repr(C)]`, have alignment 1 and no padding, and every
/// bit pattern is a valid value.
pub unsafe trait Block: Copy + 'static {
    /// The element type this block encodes.
    const TYPE: GgmlType;
}

macro_rules! blocks {
    ($($b:ty => $t:ident, $size:expr;)*) => {$(
        // SAFETY: only byte-array fields, checked below to be 1-aligned and unpadded.
        unsafe impl Block for $b {
            const TYPE: GgmlType = GgmlType::$t;
        }
        const _: () = assert!(size_of::<$b>() == $size && align_of::<$b>() == 1);
    )*};
}

blocks! {
    BlockQ4_0 => Q4_0, 18;
    BlockQ4_1 => Q4_1, 20;
    BlockQ5_0 => Q5_0, 22;
    BlockQ5_1 => Q5_1, 24;
    BlockQ8_0 => Q8_0, 34;
    BlockQ4K => Q4_K, 144;
    BlockQ5K => Q5_K, 176;
    BlockQ6K => Q6_K, 210;
}

/// Views `bytes` as blocks; a trailing partial block is not included.
pub fn as_blocks<B: Block>(bytes: &[u8]) -> &[B] {
    let n = bytes.len() / size_of::<B>();
    // SAFETY: `B` is 1-aligned, unpadded and valid for every bit pattern
    // (the `Block` contract), and `n` blocks fit in `bytes`.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), n) }
}

/// Mutable [`as_blocks`].
pub fn as_blocks_mut<B: Block>(bytes: &mut [u8]) -> &mut [B] {
    let n = bytes.len() / size_of::<B>();
    // SAFETY: as in `as_blocks`; the borrow of `bytes` is exclusive.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), n) }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
///
/// Bytes 0–3 hold scales 0–3 in their low 6 bits, bytes 4–7 mins 0–3; bytes 8–11
/// hold the low 4 bits of scale `j` (low nibble) and min `j` (high nibble) for
/// `j` = 4–7, whose top 2 bits sit in bits 6–7 of bytes `j−4` (scale) and `j` (min).
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All eight (scale, min) pairs of a Q4_K/Q5_K block: [`scale_min_k4`] for
/// `j = 0..8`, four at a time in u32 lanes.
#[inline(always)]
pub fn scales_mins_k4(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let w = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let sc_lo = w0 & 0x3f3f_3f3f;
    let m_lo = w1 & 0x3f3f_3f3f;
    let sc_hi = (w2 & 0x0f0f_0f0f) | (((w0 >> 6) & 0x0303_0303) << 4);
    let m_hi = ((w2 >> 4) & 0x0f0f_0f0f) | (((w1 >> 6) & 0x0303_0303) << 4);
    let join = |lo: u32, hi: u32| (lo as u64 | (hi as u64) << 32).to_le_bytes();
    (join(sc_lo, sc_hi), join(m_lo, m_hi))
}

/// Packs eight 6-bit scales and mins (each < 64) in the layout [`scale_min_k4`] reads.
pub fn pack_scales_mins_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        debug_assert!(sc[j] < 64 && m[j] < 64);
        if j < 4 {
            q[j] = sc[j];
            q[j + 4] = m[j];
        } else {
            q[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            q[j - 4] |= (sc[j] >> 4) << 6;
            q[j] |= (m[j] >> 4) << 6;
        }
    }
    q
}
