//! `quant` against an independent implementation: the fixtures in
//! `tests/fixtures/quant/` were written by the `gguf` Python package
//! (`make_fixtures.py`, which documents the file layout).
//!
//! Checks, for each of the 11 types: `dequantize_row` bit-identical to
//! `gguf.quants.dequantize`; `dot_row` within f32 summation error of the float64
//! dot; `dot_row_q8` within the activation's 8-bit rounding; and, where gguf can
//! quantize the type, `quantize_row` byte-identical to `gguf.quants.quantize`.

use edgetune::quant::{
    GgmlType, dequantize_row, dot_row, dot_row_q8, quantize_activation_q8, quantize_row,
};
use serde_json::Value;
use std::path::PathBuf;

struct Fixture {
    ty: GgmlType,
    rows: usize,
    n: usize,
    row_bytes: usize,
    blocks: Vec<u8>,
    dequant: Vec<f32>,
    x: Vec<f32>,
    qinput: Option<Vec<f32>>,
    dot: Vec<f64>,
    dot_abs: Vec<f64>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant")
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn load() -> Vec<Fixture> {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap())
            .unwrap();
    let fixtures = manifest["fixtures"].as_array().unwrap();
    fixtures
        .iter()
        .map(|f| {
            let us = |k: &str| f[k].as_u64().unwrap() as usize;
            let ty = GgmlType::from_u32(us("id") as u32).unwrap();
            assert_eq!(ty.name(), f["type"].as_str().unwrap());
            let data = std::fs::read(dir().join(f["file"].as_str().unwrap())).unwrap();
            let section = |name: &str| {
                let s = &f["sections"][name];
                let (off, len) = (s[0].as_u64()? as usize, s[1].as_u64()? as usize);
                Some(data[off..off + len].to_vec())
            };
            let floats = |k: &str| -> Vec<f64> {
                f[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            };
            Fixture {
                ty,
                rows: us("rows"),
                n: us("n"),
                row_bytes: us("row_bytes"),
                blocks: section("blocks").unwrap(),
                dequant: f32s(&section("dequant").unwrap()),
                x: f32s(&section("x").unwrap()),
                qinput: section("qinput").map(|b| f32s(&b)),
                dot: floats("dot"),
                dot_abs: floats("dot_abs"),
            }
        })
        .collect()
}

#[test]
fn fixtures_cover_every_type() {
    let fixtures = load();
    for ty in GgmlType::ALL {
        let f = fixtures.iter().find(|f| f.ty == ty);
        let f = f.unwrap_or_else(|| panic!("no fixture for {ty}"));
        assert_eq!(ty.row_bytes(f.n), Some(f.row_bytes));
        assert_eq!(f.blocks.len(), f.rows * f.row_bytes);
        assert_eq!(f.dequant.len(), f.rows * f.n);
    }
}

#[test]
fn dequantize_row_is_bit_identical_to_gguf() {
    for f in load() {
        for r in 0..f.rows {
            let src = &f.blocks[r * f.row_bytes..(r + 1) * f.row_bytes];
            let want = &f.dequant[r * f.n..(r + 1) * f.n];
            let mut got = vec![f32::NAN; f.n];
            dequantize_row(f.ty, src, &mut got).unwrap();
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{} row {r} [{i}]: {g} vs {w}",
                    f.ty
                );
            }
        }
    }
}

#[test]
fn dot_row_matches_float64() {
    for f in load() {
        for r in 0..f.rows {
            let src = &f.blocks[r * f.row_bytes..(r + 1) * f.row_bytes];
            let got = dot_row(f.ty, src, &f.x) as f64;
            // f32 accumulation over 16 lanes: a few ulps of Σ|w·x| per lane chain.
            let tol = 1e-6 * f.dot_abs[r] + 1e-30;
            assert!(
                (got - f.dot[r]).abs() <= tol,
                "{} row {r}: {got} vs {} (±{tol})",
                f.ty,
                f.dot[r]
            );
        }
    }
}

#[test]
fn dot_row_q8_is_within_activation_rounding() {
    for f in load() {
        let a = quantize_activation_q8(&f.x);
        for r in 0..f.rows {
            let src = &f.blocks[r * f.row_bytes..(r + 1) * f.row_bytes];
            let w = &f.dequant[r * f.n..(r + 1) * f.n];
            // |x − x̂| ≤ max|x_b|/254 per 32-value block b.
            let bound: f64 = w
                .chunks(32)
                .zip(f.x.chunks(32))
                .map(|(wc, xc)| {
                    let amax = xc.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    amax / 254.0 * wc.iter().map(|v| v.abs() as f64).sum::<f64>()
                })
                .sum();
            let tol = if f.ty.block_size() == 1 {
                0.0
            } else {
                bound * 1.001
            };
            let tol = tol + 1e-5 * f.dot_abs[r] + 1e-30;
            let got = dot_row_q8(f.ty, src, &a) as f64;
            assert!(
                (got - f.dot[r]).abs() <= tol,
                "{} row {r}: {got} vs {} (±{tol})",
                f.ty,
                f.dot[r]
            );
        }
    }
}

#[test]
fn quantize_row_is_byte_identical_to_gguf() {
    let mut checked = Vec::new();
    for f in load() {
        let Some(input) = &f.qinput else { continue };
        let mut got = vec![0u8; f.row_bytes];
        quantize_row(f.ty, input, &mut got).unwrap();
        let want = &f.blocks[..f.row_bytes];
        let bad: Vec<usize> = (0..f.row_bytes).filter(|&i| got[i] != want[i]).collect();
        assert!(bad.is_empty(), "{}: bytes differ at {bad:?}", f.ty);
        checked.push(f.ty);
    }
    assert_eq!(checked.len(), 7, "{checked:?}");
}
