//! A KV cache and working memory on the GPU, and the forward pass recorded
//! as one list of dispatches per token count: a prompt chunk, or one
//! generated token, is one submission; between steps the host writes only
//! the position, the token ids and the sampling numbers, and reads back only
//! what was asked for (the chosen token, logits, or per-token losses).

use super::context::Dispatch;
use super::decoder::GpuDecoder;
use super::matmul::{MatmulKernel, MatmulShape, embed, matmul};
use super::ops::{self, SampleParams, StepParams};
use super::{GpuContext, GpuWeight};
use crate::backend::cpu::attention::AttnShape;
use crate::backend::{Logits, Pick, Session, check_targets, check_tokens};
use crate::model::Rope;
use crate::{Error, Result};
use std::collections::HashMap;

/// Most tokens one pass runs; longer inputs run as several passes.
const PASS_TOKENS: usize = 512;
/// Bytes of logits computed at once when every position's are wanted.
const LOGIT_BYTES: u64 = 64 << 20;
/// Plans kept per session (prompt chunks of a few lengths, and one token).
const MAX_PLANS: usize = 8;

/// Activation buffers for passes of up to `max_tok` tokens.
struct Workspace {
    max_tok: usize,
    /// Rows of logits computed at once.
    logit_rows: usize,
    tokens: wgpu::Buffer,
    targets: wgpu::Buffer,
    x: wgpu::Buffer,
    h: wgpu::Buffer,
    q: wgpu::Buffer,
    kb: wgpu::Buffer,
    vb: wgpu::Buffer,
    att: wgpu::Buffer,
    o: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    logits: wgpu::Buffer,
    nll: wgpu::Buffer,
    token_out: wgpu::Buffer,
    /// Where the chosen token is read back from, kept between steps.
    token_staging: wgpu::Buffer,
}

/// What follows the blocks in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Tail {
    /// Argmax of the last position's logits.
    Greedy(usize),
    /// A draw from the last position's logits.
    Draw(usize),
    /// The last position's logits.
    Last(usize),
    /// Logits of rows `start..start + rows`.
    Logits(usize, usize),
    /// Logits and losses of rows `start..start + rows`.
    Nll(usize, usize),
}

/// A KV cache on the GPU for one sequence.
pub struct GpuSession<'d, 'm> {
    dec: &'d GpuDecoder<'m>,
    capacity: usize,
    len: usize,
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    /// cos/sin tables, and which one each layer uses.
    tables: Vec<wgpu::Buffer>,
    layer_table: Vec<usize>,
    step: wgpu::Buffer,
    sample: wgpu::Buffer,
    ws: Workspace,
    plans: HashMap<usize, Vec<Dispatch>>,
    tails: HashMap<Tail, Vec<Dispatch>>,
}

fn check_binding(ctx: &GpuContext, bytes: u64, what: &str) -> Result<()> {
    if bytes > ctx.max_binding() {
        return Err(Error::Gpu(format!(
            "{what} needs {bytes} bytes in one binding; the device allows {}",
            ctx.max_binding()
        )));
    }
    Ok(())
}

impl<'d, 'm> GpuSession<'d, 'm> {
    pub(crate) fn new(dec: &'d GpuDecoder<'m>, capacity: usize) -> Result<Self> {
        let ctx = &dec.ctx;
        let s = dec.spec();
        if capacity == 0 {
            return Err(Error::Invalid(
                "a session needs room for at least one token".into(),
            ));
        }
        let kv_dim = s.n_kv_head * s.head_dim;
        let kv_bytes = (capacity * kv_dim * ctx.kv_format().bytes()) as u64;
        check_binding(ctx, kv_bytes, "the KV cache of one layer")?;
        let k = (0..s.layers.len())
            .map(|_| ctx.storage(kv_bytes, "k-cache"))
            .collect();
        let v = (0..s.layers.len())
            .map(|_| ctx.storage(kv_bytes, "v-cache"))
            .collect();
        let mut ropes: Vec<Rope> = Vec::new();
        let mut layer_table = Vec::new();
        for l in &s.layers {
            let i = match ropes.iter().position(|r| *r == l.rope) {
                Some(i) => i,
                None => {
                    ropes.push(l.rope);
                    ropes.len() - 1
                }
            };
            layer_table.push(i);
        }
        let mut tables = Vec::new();
        for r in &ropes {
            let t = ops::rope_table(r, capacity);
            check_binding(ctx, t.len() as u64 * 4, "a RoPE table")?;
            tables.push(ctx.upload(bytemuck::cast_slice(&t), "rope-table"));
        }
        let ws = Workspace::new(ctx, s, capacity.min(PASS_TOKENS))?;
        Ok(GpuSession {
            dec,
            capacity,
            len: 0,
            k,
            v,
            tables,
            layer_table,
            step: ctx.uniform(&StepParams::default(), "step"),
            sample: ctx.uniform(&SampleParams::default(), "sample"),
            ws,
            plans: HashMap::new(),
            tails: HashMap::new(),
        })
    }

    fn ctx(&self) -> &GpuContext {
        &self.dec.ctx
    }

    /// The dispatches of the blocks for a pass of `n` tokens (cached).
    fn plan(&mut self, n: usize) -> Result<&[Dispatch]> {
        if !self.plans.contains_key(&n) {
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            let plan = self.build_plan(n)?;
            self.plans.insert(n, plan);
        }
        Ok(&self.plans[&n])
    }

    fn build_plan(&self, n: usize) -> Result<Vec<Dispatch>> {
        let ctx = self.ctx();
        let dec = self.dec;
        let s = dec.spec();
        let w = &self.ws;
        let (e, d) = (s.n_embd, s.head_dim);
        let (q_dim, kv_dim) = (s.n_head * d, s.n_kv_head * d);
        let mm = |wt: &GpuWeight, x: &wgpu::Buffer, y: &wgpu::Buffer, cols: usize, rows: usize| {
            matmul(
                ctx,
                wt,
                x,
                y,
                MatmulShape {
                    n_tok: n,
                    x_off: 0,
                    x_stride: cols,
                    y_off: 0,
                    y_stride: rows,
                },
                MatmulKernel::Auto,
            )
        };
        let eps = s.norm_eps;
        let mut p = Vec::new();
        p.extend(embed(
            ctx,
            &dec.token_embd,
            &w.tokens,
            &w.x,
            n,
            s.embed_scale.unwrap_or(1.0),
        )?);
        // Each block ends with its residual add fused with the next norm (the
        // next block's attention norm, or the output norm after the last):
        // the final-norm hidden states land in `h`.
        let first = dec
            .layers
            .first()
            .map_or(&dec.output_norm, |l| &l.attn_norm);
        p.push(ops::rms_norm(ctx, &w.x, first, &w.h, n, e, eps)?);
        for (li, (l, lw)) in s.layers.iter().zip(&dec.layers).enumerate() {
            let table = &self.tables[self.layer_table[li]];
            p.extend(mm(&lw.wq, &w.h, &w.q, e, q_dim)?);
            p.extend(mm(&lw.wk, &w.h, &w.kb, e, kv_dim)?);
            p.extend(mm(&lw.wv, &w.h, &w.vb, e, kv_dim)?);
            if let Some(qn) = &lw.q_norm {
                p.push(ops::rms_norm_inplace(ctx, &w.q, qn, n * s.n_head, d, eps)?);
            }
            if let Some(kn) = &lw.k_norm {
                p.push(ops::rms_norm_inplace(
                    ctx,
                    &w.kb,
                    kn,
                    n * s.n_kv_head,
                    d,
                    eps,
                )?);
            }
            let r = &l.rope;
            p.push(ops::rope_kv(
                ctx,
                &w.q,
                &w.kb,
                &w.vb,
                &self.k[li],
                &self.v[li],
                table,
                &self.step,
                n,
                (s.n_head, s.n_kv_head),
                d,
                r.kind,
                r.dims,
                ctx.kv_format(),
            )?);
            let shape = AttnShape {
                n_head: s.n_head,
                n_kv_head: s.n_kv_head,
                head_dim: d,
                scale: s.attn_scale,
                window: l.window,
            };
            p.push(ops::attention(
                ctx,
                &w.q,
                &self.k[li],
                &self.v[li],
                &w.att,
                &self.step,
                &shape,
                n,
                ctx.kv_format(),
            )?);
            p.extend(mm(&lw.wo, &w.att, &w.o, q_dim, e)?);
            p.push(ops::add_rms_norm(
                ctx,
                &w.x,
                &w.o,
                lw.post_attn_norm.as_ref(),
                &lw.ffn_norm,
                &w.h,
                n,
                e,
                eps,
            )?);
            p.extend(mm(&lw.gate, &w.h, &w.gate, e, s.n_ff)?);
            p.extend(mm(&lw.up, &w.h, &w.up, e, s.n_ff)?);
            p.push(ops::gated_activation(
                ctx,
                &w.gate,
                &w.up,
                n * s.n_ff,
                s.activation,
            )?);
            p.extend(mm(&lw.down, &w.gate, &w.o, s.n_ff, e)?);
            let next = dec
                .layers
                .get(li + 1)
                .map_or(&dec.output_norm, |nl| &nl.attn_norm);
            p.push(ops::add_rms_norm(
                ctx,
                &w.x,
                &w.o,
                lw.post_ffn_norm.as_ref(),
                next,
                &w.h,
                n,
                e,
                eps,
            )?);
        }
        Ok(p)
    }

    /// The dispatches after the blocks (cached).
    fn tail(&mut self, t: Tail) -> Result<&[Dispatch]> {
        if !self.tails.contains_key(&t) {
            if self.tails.len() >= 4 * MAX_PLANS {
                self.tails.clear();
            }
            let d = self.build_tail(t)?;
            self.tails.insert(t, d);
        }
        Ok(&self.tails[&t])
    }

    fn build_tail(&self, t: Tail) -> Result<Vec<Dispatch>> {
        let ctx = self.ctx();
        let s = self.dec.spec();
        let w = &self.ws;
        let (e, nv) = (s.n_embd, s.n_vocab);
        let logits = |start: usize, rows: usize| {
            matmul(
                ctx,
                self.dec.output(),
                &w.h,
                &w.logits,
                MatmulShape {
                    n_tok: rows,
                    x_off: start * e,
                    x_stride: e,
                    y_off: 0,
                    y_stride: nv,
                },
                MatmulKernel::Auto,
            )
        };
        Ok(match t {
            Tail::Last(n) => logits(n - 1, 1)?,
            Tail::Greedy(n) => {
                let mut v = logits(n - 1, 1)?;
                v.push(ops::argmax(ctx, &w.logits, 0, nv, &w.token_out)?);
                v
            }
            Tail::Draw(n) => {
                let mut v = logits(n - 1, 1)?;
                v.push(ops::sample(
                    ctx,
                    &w.logits,
                    0,
                    nv,
                    &self.sample,
                    &w.token_out,
                )?);
                v
            }
            Tail::Logits(start, rows) => logits(start, rows)?,
            Tail::Nll(start, rows) => {
                let mut v = logits(start, rows)?;
                v.push(ops::nll(
                    ctx, &w.logits, &w.targets, &w.nll, start, rows, nv,
                )?);
                v
            }
        })
    }

    /// Write the inputs of a pass of `tokens` and record its blocks.
    fn begin(&mut self, tokens: &[u32]) -> Result<wgpu::CommandEncoder> {
        let ctx = &self.dec.ctx;
        ctx.queue
            .write_buffer(&self.ws.tokens, 0, bytemuck::cast_slice(tokens));
        let step = StepParams {
            pos0: self.len as u32,
            n_tok: tokens.len() as u32,
            _pad: [0; 2],
        };
        ctx.queue
            .write_buffer(&self.step, 0, bytemuck::bytes_of(&step));
        let mut enc = ctx.encoder();
        let plan = self.plan(tokens.len())?;
        GpuContext::record(&mut enc, plan);
        Ok(enc)
    }

    /// Run all but the last pass of `tokens`, returning the last pass's
    /// tokens and its encoder (blocks recorded, not submitted).
    fn run_leading(&mut self, tokens: &[u32]) -> Result<(usize, wgpu::CommandEncoder)> {
        check_tokens(self.dec.spec(), tokens, self.len, self.capacity)?;
        let max = self.ws.max_tok;
        let mut chunks = tokens.chunks(max).peekable();
        loop {
            let chunk = chunks.next().expect("tokens are not empty");
            let enc = self.begin(chunk)?;
            if chunks.peek().is_none() {
                return Ok((chunk.len(), enc));
            }
            self.dec.ctx.queue.submit([enc.finish()]);
            self.len += chunk.len();
        }
    }
}

impl GpuSession<'_, '_> {
    /// Time each kernel of a pass of `n_tok` tokens after those held (each
    /// submitted alone and waited for): seconds summed per kernel name,
    /// slowest first. The session's tokens are unchanged.
    pub fn profile(&mut self, n_tok: usize) -> Result<Vec<(String, usize, f64)>> {
        let tokens = vec![0u32; n_tok];
        check_tokens(self.dec.spec(), &tokens, self.len, self.capacity)?;
        drop(self.begin(&tokens)?);
        let ctx = self.dec.ctx.clone();
        self.tail(Tail::Greedy(n_tok))?;
        let layers = self.plans[&n_tok].iter().map(|d| (d, ""));
        let tail = self.tails[&Tail::Greedy(n_tok)]
            .iter()
            .map(|d| (d, " (tail)"));
        let mut by: HashMap<String, (usize, f64)> = HashMap::new();
        for (d, suffix) in layers.chain(tail) {
            let mut enc = ctx.encoder();
            GpuContext::record(&mut enc, std::slice::from_ref(d));
            let t = std::time::Instant::now();
            ctx.submit_and_wait(enc)?;
            let e = by.entry(format!("{}{suffix}", d.name)).or_default();
            e.0 += 1;
            e.1 += t.elapsed().as_secs_f64();
        }
        let mut v: Vec<(String, usize, f64)> =
            by.into_iter().map(|(k, (n, t))| (k, n, t)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        Ok(v)
    }
}

impl Session for GpuSession<'_, '_> {
    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    fn run(&mut self, tokens: &[u32]) -> Result<()> {
        let (n, enc) = self.run_leading(tokens)?;
        self.dec.ctx.submit_and_wait(enc)?;
        self.len += n;
        Ok(())
    }

    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let nv = self.dec.spec().n_vocab;
        if which == Logits::Last {
            let (n, mut enc) = self.run_leading(tokens)?;
            GpuContext::record(&mut enc, self.tail(Tail::Last(n))?);
            let bytes = self
                .dec
                .ctx
                .submit_and_read(enc, &self.ws.logits, 0, nv as u64 * 4)?;
            self.len += n;
            return Ok(bytemuck::pod_collect_to_vec(&bytes));
        }
        check_tokens(self.dec.spec(), tokens, self.len, self.capacity)?;
        let mut out = Vec::with_capacity(tokens.len() * nv);
        for chunk in tokens.chunks(self.ws.max_tok) {
            let n = chunk.len();
            let mut enc = Some(self.begin(chunk)?);
            let rows = self.ws.logit_rows;
            for start in (0..n).step_by(rows) {
                let r = rows.min(n - start);
                let mut e = enc.take().unwrap_or_else(|| self.dec.ctx.encoder());
                GpuContext::record(&mut e, self.tail(Tail::Logits(start, r))?);
                let bytes =
                    self.dec
                        .ctx
                        .submit_and_read(e, &self.ws.logits, 0, (r * nv) as u64 * 4)?;
                out.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&bytes));
            }
            self.len += n;
        }
        Ok(out)
    }

    fn forward_pick(&mut self, tokens: &[u32], pick: &Pick) -> Result<u32> {
        let (n, mut enc) = self.run_leading(tokens)?;
        let tail = match *pick {
            Pick::Greedy => Tail::Greedy(n),
            Pick::Draw {
                temperature,
                top_k,
                top_p,
                u,
            } => {
                let p = SampleParams {
                    temperature,
                    top_k: top_k.min(u32::MAX as usize) as u32,
                    top_p,
                    u: (u as f32).min(1.0 - f32::EPSILON),
                };
                self.dec
                    .ctx
                    .queue
                    .write_buffer(&self.sample, 0, bytemuck::bytes_of(&p));
                Tail::Draw(n)
            }
        };
        GpuContext::record(&mut enc, self.tail(tail)?);
        let bytes = self.dec.ctx.submit_and_read_via(
            enc,
            &self.ws.token_out,
            0,
            4,
            &self.ws.token_staging,
        )?;
        self.len += n;
        Ok(bytemuck::pod_read_unaligned(&bytes[..4]))
    }

    fn forward_nll(&mut self, tokens: &[u32], targets: &[u32]) -> Result<Vec<f64>> {
        let s = self.dec.spec();
        check_tokens(s, tokens, self.len, self.capacity)?;
        check_targets(s, tokens, targets)?;
        let mut out = Vec::with_capacity(tokens.len());
        for (chunk, tgt) in tokens
            .chunks(self.ws.max_tok)
            .zip(targets.chunks(self.ws.max_tok))
        {
            let n = chunk.len();
            self.dec
                .ctx
                .queue
                .write_buffer(&self.ws.targets, 0, bytemuck::cast_slice(tgt));
            let mut enc = self.begin(chunk)?;
            let rows = self.ws.logit_rows;
            for start in (0..n).step_by(rows) {
                let r = rows.min(n - start);
                GpuContext::record(&mut enc, self.tail(Tail::Nll(start, r))?);
            }
            let bytes = self
                .dec
                .ctx
                .submit_and_read(enc, &self.ws.nll, 0, n as u64 * 4)?;
            out.extend(
                bytemuck::cast_slice::<u8, f32>(&bytes)
                    .iter()
                    .map(|&v| v as f64),
            );
            self.len += n;
        }
        Ok(out)
    }

    fn dispatches_per_token(&self) -> usize {
        // Built on demand: a session that has not generated yet reports the
        // count its one-token step would have.
        let layers = self.plans.get(&1).map(Vec::len);
        let tail = self.tails.get(&Tail::Greedy(1)).map(Vec::len);
        match (layers, tail) {
            (Some(l), Some(t)) => l + t,
            _ => self
                .build_plan(1)
                .and_then(|p| Ok(p.len() + self.build_tail(Tail::Greedy(1))?.len()))
                .unwrap_or(0),
        }
    }
}

impl Workspace {
    fn new(ctx: &GpuContext, s: &crate::model::DecoderSpec, max_tok: usize) -> Result<Self> {
        let f = |n: usize, what: &str| -> Result<wgpu::Buffer> {
            let bytes = n as u64 * 4;
            check_binding(ctx, bytes, what)?;
            Ok(ctx.storage(bytes, what))
        };
        let q_dim = s.n_head * s.head_dim;
        let kv_dim = s.n_kv_head * s.head_dim;
        let row_bytes = s.n_vocab as u64 * 4;
        let fit = (LOGIT_BYTES.min(ctx.max_binding()) / row_bytes) as usize;
        if fit == 0 {
            return Err(Error::Gpu(format!(
                "one row of logits ({row_bytes} bytes) exceeds the device's binding limit of {} bytes",
                ctx.max_binding()
            )));
        }
        let logit_rows = fit.min(max_tok);
        Ok(Workspace {
            max_tok,
            logit_rows,
            tokens: f(max_tok, "tokens")?,
            targets: f(max_tok, "targets")?,
            x: f(max_tok * s.n_embd, "x")?,
            h: f(max_tok * s.n_embd, "h")?,
            q: f(max_tok * q_dim, "q")?,
            kb: f(max_tok * kv_dim, "k")?,
            vb: f(max_tok * kv_dim, "v")?,
            att: f(max_tok * q_dim, "attention")?,
            o: f(max_tok * s.n_embd, "o")?,
            gate: f(max_tok * s.n_ff, "gate")?,
            up: f(max_tok * s.n_ff, "up")?,
            logits: f(logit_rows * s.n_vocab, "logits")?,
            nll: f(max_tok, "nll")?,
            token_out: f(4, "token")?,
            token_staging: ctx.staging(4),
        })
    }
}
