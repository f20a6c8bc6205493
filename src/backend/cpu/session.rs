//! [`CpuDecoder`] behind the backend-neutral [`Decoder`]/[`Session`] interface.

use super::decoder::{CpuDecoder, KvCache};
use super::matmul::{QMatrix, matmul_with};
use super::ops::log_sum_exp;
use crate::Result;
use crate::backend::{Decoder, Logits, Pick, Session, check_targets, check_tokens, draw_sorted};
use crate::model::DecoderSpec;
use crate::quant::GgmlType;
use std::time::Instant;

/// Logit values computed at once when scoring (64 MB): bounds memory to this
/// instead of `n_tok × n_vocab`, while keeping chunks long enough that the
/// output matrix is decoded only a few times per pass.
const LOGIT_BUDGET: usize = 16 << 20;

impl Decoder for CpuDecoder<'_> {
    fn spec(&self) -> &DecoderSpec {
        CpuDecoder::spec(self)
    }

    fn device_name(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn backend(&self) -> &'static str {
        "cpu"
    }

    fn time_matmul(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &[u8],
        n_tok: usize,
        reps: usize,
    ) -> Result<f64> {
        let w = QMatrix::new(ty, rows, cols, data)?;
        let x: Vec<f32> = (0..n_tok * cols)
            .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
            .collect();
        let mut y = vec![0.0; n_tok * rows];
        let mut times = Vec::with_capacity(reps);
        self.install(|| {
            matmul_with(&x, &w, &mut y, self.matvec_mode());
            for _ in 0..reps.max(1) {
                let t = Instant::now();
                matmul_with(&x, &w, &mut y, self.matvec_mode());
                times.push(t.elapsed().as_secs_f64());
            }
        });
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    fn session(&self, capacity: usize) -> Result<Box<dyn Session + '_>> {
        Ok(Box::new(CpuSession {
            cache: self.new_cache(capacity),
            decoder: self,
            scratch: Vec::new(),
        }))
    }
}

/// A KV cache on the CPU and the decoder that fills it.
pub struct CpuSession<'d, 'm> {
    decoder: &'d CpuDecoder<'m>,
    cache: KvCache,
    scratch: Vec<(u32, f32)>,
}

impl Session for CpuSession<'_, '_> {
    /// Tokens run, not counting the adapters' virtual tokens (prompt and
    /// prefix tuning), which take the cache's first slots.
    fn len(&self) -> usize {
        let n = self.cache.len();
        if n == 0 {
            0
        } else {
            n - self.decoder.virtual_rows().min(n)
        }
    }

    fn capacity(&self) -> usize {
        self.cache.capacity() - self.decoder.virtual_rows().min(self.cache.capacity())
    }

    fn clear(&mut self) {
        self.cache.clear();
    }

    fn run(&mut self, tokens: &[u32]) -> Result<()> {
        self.decoder
            .forward_hidden(tokens, &mut self.cache)
            .map(drop)
    }

    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.decoder.forward(tokens, &mut self.cache, which)
    }

    fn forward_pick(&mut self, tokens: &[u32], pick: &Pick) -> Result<u32> {
        let logits = self
            .decoder
            .forward(tokens, &mut self.cache, Logits::Last)?;
        Ok(draw_sorted(&logits, pick, &mut self.scratch))
    }

    fn forward_nll(&mut self, tokens: &[u32], targets: &[u32]) -> Result<Vec<f64>> {
        let s = self.decoder.spec();
        check_tokens(s, tokens, self.cache.len(), self.cache.capacity())?;
        check_targets(s, tokens, targets)?;
        let hidden = self.decoder.forward_hidden(tokens, &mut self.cache)?;
        let (n_embd, n_vocab) = (s.n_embd, s.n_vocab);
        let chunk = (LOGIT_BUDGET / n_vocab).max(1);
        let mut out = Vec::with_capacity(tokens.len());
        for start in (0..tokens.len()).step_by(chunk) {
            let end = (start + chunk).min(tokens.len());
            let logits = self.decoder.logits(&hidden[start * n_embd..end * n_embd])?;
            for (row, &t) in logits.chunks_exact(n_vocab).zip(&targets[start..end]) {
                out.push(log_sum_exp(row) - row[t as usize] as f64);
            }
        }
        Ok(out)
    }
}
