//! Generation for many requests at once, each with its own adapters, in
//! the way S-LoRA and Punica serve many adapters on one base: every decode
//! step runs the frozen products once over one row per request, and each
//! request's LoRA products only on its own row.
//!
//! A request's prompt runs alone when it is added (a prompt pass is already
//! a GEMM over its tokens); from then on it joins the shared decode steps.
//! In the default [`BatchOptions::invariant`] mode the shared steps use
//! batch-invariant products ([`crate::backend::cpu::invariant`]), so
//! batching never changes a request's tokens: it gets the same ones in any
//! batch, alone included.

use super::generate::{GenerateOptions, Generation, PREFILL_CHUNK, StopReason};
use super::sample::Sampler;
use crate::backend::cpu::{CpuDecoder, KvCache, SeqPass};
use crate::backend::draw_sorted;
use crate::peft::AdapterWeights;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};
use std::sync::Arc;
use std::time::Instant;

/// How a [`Batch`] runs its shared steps.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Most requests decoded together; [`Batch::add`] refuses more.
    pub max_batch: usize,
    /// Batch-invariant shared steps: a request's tokens do not depend on
    /// the other requests. `false` takes the fastest product for each batch
    /// size, whose last bits (and so, rarely, tokens) depend on it.
    pub invariant: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch: 16,
            invariant: true,
        }
    }
}

/// One request's place in a [`Batch`].
pub type RequestId = u64;

/// What [`Batch::step`] reports.
#[derive(Debug, Clone)]
pub enum BatchEvent {
    /// A request produced a token; `text` is what it completed (possibly
    /// empty: a character can span tokens).
    Token {
        /// The request.
        id: RequestId,
        /// The token.
        token: u32,
        /// Text completed by this token.
        text: String,
    },
    /// A request finished; it has left the batch.
    Done {
        /// The request.
        id: RequestId,
        /// Text the end of the token stream completed (bytes held back
        /// waiting for a whole character), not reported by any `Token`.
        tail: String,
        /// Everything it produced.
        generation: Generation,
    },
}

struct Active {
    id: RequestId,
    cache: KvCache,
    adapters: Vec<Arc<AdapterWeights>>,
    opts: GenerateOptions,
    sampler: Sampler,
    stream: StreamDecoder,
    /// The token chosen by the last pass, not yet reported.
    next: u32,
    tokens: Vec<u32>,
    text: String,
    prompt_tokens: usize,
    prompt_seconds: f64,
    started: Instant,
}

/// Requests being generated together on one CPU decoder.
pub struct Batch<'d, 'm> {
    decoder: &'d CpuDecoder<'m>,
    tokenizer: &'d Tokenizer,
    options: BatchOptions,
    active: Vec<Active>,
    next_id: RequestId,
    scratch: Vec<(u32, f32)>,
}

impl<'d, 'm> Batch<'d, 'm> {
    /// An empty batch.
    pub fn new(
        decoder: &'d CpuDecoder<'m>,
        tokenizer: &'d Tokenizer,
        options: BatchOptions,
    ) -> Self {
        Batch {
            decoder,
            tokenizer,
            options: BatchOptions {
                max_batch: options.max_batch.max(1),
                ..options
            },
            active: Vec::new(),
            next_id: 0,
            scratch: Vec::new(),
        }
    }

    /// Requests in the batch.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// True when no request is being generated.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// True when [`Batch::add`] would refuse for lack of room.
    pub fn is_full(&self) -> bool {
        self.active.len() >= self.options.max_batch
    }

    /// Run `prompt` (token ids, special tokens included) alone with
    /// `adapters` (on top of the decoder's own) and add the request to the
    /// batch. Its tokens come out of later [`Batch::step`] calls.
    pub fn add(
        &mut self,
        prompt: &[u32],
        adapters: Vec<Arc<AdapterWeights>>,
        opts: GenerateOptions,
    ) -> Result<RequestId> {
        if self.is_full() {
            return Err(Error::Invalid(format!(
                "the batch is full ({} requests)",
                self.options.max_batch
            )));
        }
        opts.sampling.validate()?;
        if prompt.is_empty() {
            return Err(Error::Invalid("the prompt is empty (no tokens)".into()));
        }
        let ctx = self.decoder.spec().context_length;
        if prompt.len() >= ctx {
            return Err(Error::Invalid(format!(
                "the prompt has {} tokens; the model's context is {ctx}",
                prompt.len()
            )));
        }
        let capacity = prompt.len().saturating_add(opts.max_tokens).min(ctx);
        let mut cache = self.decoder.new_cache(capacity);
        let mut sampler = Sampler::new(opts.sampling);
        let t0 = Instant::now();
        let mut hidden = Vec::new();
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            let mut seq = [SeqPass {
                tokens: chunk,
                cache: &mut cache,
                adapters: &adapters,
            }];
            hidden = self.decoder.forward_batch(&mut seq, false)?;
        }
        let e = self.decoder.spec().n_embd;
        let logits = self
            .decoder
            .logits_batch(&hidden[hidden.len() - e..], &[&adapters], false)?;
        let next = draw_sorted(&logits, &sampler.pick(), &mut self.scratch);
        let id = self.next_id;
        self.next_id += 1;
        self.active.push(Active {
            id,
            cache,
            adapters,
            opts,
            sampler,
            stream: self.tokenizer.stream_decoder(),
            next,
            tokens: Vec::new(),
            text: String::new(),
            prompt_tokens: prompt.len(),
            prompt_seconds: t0.elapsed().as_secs_f64(),
            started: Instant::now(),
        });
        Ok(id)
    }

    /// Stop a request now; its `Done` event (stop reason
    /// [`StopReason::Stopped`]) is returned. `None` when it is not in the batch.
    pub fn cancel(&mut self, id: RequestId) -> Option<BatchEvent> {
        let i = self.active.iter().position(|a| a.id == id)?;
        let a = self.active.remove(i);
        Some(self.finish(a, StopReason::Stopped))
    }

    /// Report every request's pending token, retire the requests that are
    /// done, and run one shared pass for the rest to choose their next
    /// tokens. Events come in the order of the requests in the batch.
    pub fn step(&mut self, on_event: &mut dyn FnMut(BatchEvent)) -> Result<()> {
        // The checks of `generate`'s loop, except that a request that has
        // its last token finishes at once instead of after one more pass.
        let mut going = Vec::with_capacity(self.active.len());
        for mut a in std::mem::take(&mut self.active) {
            if a.tokens.len() >= a.opts.max_tokens {
                on_event(self.finish(a, StopReason::MaxTokens));
                continue;
            }
            let id = a.next;
            a.tokens.push(id);
            if a.opts.stop_at_end && self.tokenizer.is_end_of_generation(id) {
                on_event(self.finish(a, StopReason::EndOfGeneration));
                continue;
            }
            let piece = a.stream.push(self.tokenizer, id);
            a.text.push_str(&piece);
            on_event(BatchEvent::Token {
                id: a.id,
                token: id,
                text: piece,
            });
            if a.tokens.len() >= a.opts.max_tokens {
                on_event(self.finish(a, StopReason::MaxTokens));
                continue;
            }
            if a.cache.len() >= a.cache.capacity() {
                on_event(self.finish(a, StopReason::ContextFull));
                continue;
            }
            going.push(a);
        }
        self.active = going;
        if self.active.is_empty() {
            return Ok(());
        }
        let tokens: Vec<[u32; 1]> = self.active.iter().map(|a| [a.next]).collect();
        let mut seqs: Vec<SeqPass> = self
            .active
            .iter_mut()
            .zip(&tokens)
            .map(|(a, t)| SeqPass {
                tokens: t,
                cache: &mut a.cache,
                adapters: &a.adapters,
            })
            .collect();
        let hidden = self
            .decoder
            .forward_batch(&mut seqs, self.options.invariant)?;
        drop(seqs);
        let adapters: Vec<&[Arc<AdapterWeights>]> =
            self.active.iter().map(|a| a.adapters.as_slice()).collect();
        let logits = self
            .decoder
            .logits_batch(&hidden, &adapters, self.options.invariant)?;
        let n_vocab = self.decoder.spec().n_vocab;
        for (a, row) in self.active.iter_mut().zip(logits.chunks_exact(n_vocab)) {
            a.next = draw_sorted(row, &a.sampler.pick(), &mut self.scratch);
        }
        Ok(())
    }

    fn finish(&self, mut a: Active, stop: StopReason) -> BatchEvent {
        let tail = a.stream.finish();
        a.text.push_str(&tail);
        BatchEvent::Done {
            id: a.id,
            tail,
            generation: Generation {
                prompt_tokens: a.prompt_tokens,
                tokens: a.tokens,
                text: a.text,
                stop,
                prompt_seconds: a.prompt_seconds,
                generate_seconds: a.started.elapsed().as_secs_f64(),
            },
        }
    }
}
