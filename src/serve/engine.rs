//! The engine thread: takes jobs from the HTTP side, keeps up to
//! `max_batch` of them in one [`Batch`] (the rest wait in arrival order),
//! runs one shared decode step after another, and sends each request its
//! text as it comes. A request whose client has gone is dropped at the
//! next step.

use super::openai::{Job, Prompt, Usage};
use crate::backend::cpu::CpuDecoder;
use crate::infer::{Batch, BatchEvent, BatchOptions, RequestId, StopReason};
use crate::peft::AdapterWeights;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What the engine tells the HTTP side about one request.
#[derive(Debug)]
pub enum Reply {
    /// The prompt ran; text follows.
    Started {
        /// Tokens of the prompt.
        prompt_tokens: usize,
    },
    /// More text.
    Text(String),
    /// The end: `"stop"` (end token or stop sequence) or `"length"`.
    Done {
        /// OpenAI's finish reason.
        finish: &'static str,
        /// Token counts.
        usage: Usage,
    },
    /// The request could not run (prompt too long, template error, …).
    Failed {
        /// HTTP status.
        status: u16,
        /// Why.
        message: String,
    },
}

/// A job with the channel its replies go to.
pub struct Submission {
    /// The request.
    pub job: Job,
    /// Where replies go; closed when the client has gone.
    pub reply: UnboundedSender<Reply>,
}

/// One request in the batch.
struct Live {
    reply: UnboundedSender<Reply>,
    stop: StopFilter,
    usage: Usage,
    started: Instant,
    model: String,
}

/// What the engine needs besides the jobs.
pub struct Engine<'d, 'm> {
    /// The base model on the CPU.
    pub decoder: &'d CpuDecoder<'m>,
    /// Its tokenizer.
    pub tokenizer: &'d Tokenizer,
    /// Its chat template, if it has one.
    pub template: Option<&'d ChatTemplate>,
    /// Adapters by the model name that selects them; the base name maps to none.
    pub models: &'d HashMap<String, Vec<Arc<AdapterWeights>>>,
    /// Batch size and kernels.
    pub batch: BatchOptions,
    /// Most requests waiting for a place in the batch; more are refused (503).
    pub max_waiting: usize,
    /// Log finished requests (a line each) here.
    pub log: &'d (dyn Fn(&str) + Sync),
}

impl Engine<'_, '_> {
    /// Serve jobs from `jobs` until `stop()` is true or every sender is gone.
    pub fn run(&self, jobs: &Receiver<Submission>, stop: &(dyn Fn() -> bool + Sync)) -> Result<()> {
        let mut batch = Batch::new(self.decoder, self.tokenizer, self.batch);
        let mut waiting: VecDeque<Submission> = VecDeque::new();
        let mut live: HashMap<RequestId, Live> = HashMap::new();
        loop {
            if stop() {
                return Ok(());
            }
            if batch.is_empty() && waiting.is_empty() {
                match jobs.recv_timeout(Duration::from_millis(100)) {
                    Ok(s) => waiting.push_back(s),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            while let Ok(s) = jobs.try_recv() {
                if waiting.len() >= self.max_waiting {
                    let _ = s.reply.send(Reply::Failed {
                        status: 503,
                        message: format!(
                            "the server is busy: {} requests are waiting; try again later",
                            waiting.len()
                        ),
                    });
                    continue;
                }
                waiting.push_back(s);
            }
            // A prompt pass stalls every stream in the batch: while some are
            // decoding, take one new request per step.
            let mut admit = if batch.is_empty() { usize::MAX } else { 1 };
            while !batch.is_full() && admit > 0 {
                let Some(s) = waiting.pop_front() else { break };
                if s.reply.is_closed() {
                    continue;
                }
                admit -= 1;
                match self.admit(&mut batch, &s.job) {
                    Ok((id, prompt_tokens)) => {
                        let _ = s.reply.send(Reply::Started { prompt_tokens });
                        live.insert(
                            id,
                            Live {
                                reply: s.reply,
                                stop: StopFilter::new(s.job.stop),
                                usage: Usage {
                                    prompt_tokens,
                                    completion_tokens: 0,
                                },
                                started: Instant::now(),
                                model: s.job.model,
                            },
                        );
                    }
                    Err(e) => {
                        let _ = s.reply.send(Reply::Failed {
                            status: 400,
                            message: e.to_string(),
                        });
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let mut gone = Vec::new();
            let stepped = batch.step(&mut |e| match e {
                BatchEvent::Token { id, text, .. } => {
                    let Some(l) = live.get_mut(&id) else { return };
                    if l.reply.is_closed() {
                        gone.push(id);
                        return;
                    }
                    l.usage.completion_tokens += 1;
                    let (out, hit) = l.stop.push(&text);
                    if !out.is_empty() && l.reply.send(Reply::Text(out)).is_err() {
                        gone.push(id);
                    } else if hit {
                        self.finish(l, "stop");
                        gone.push(id);
                    }
                }
                BatchEvent::Done {
                    id,
                    tail,
                    generation,
                } => {
                    if gone.contains(&id) {
                        // Already finished by a stop sequence in this step.
                        return;
                    }
                    let Some(mut l) = live.remove(&id) else {
                        return;
                    };
                    let (mut out, hit) = l.stop.push(&tail);
                    if !hit {
                        out.push_str(&l.stop.finish());
                    }
                    if !out.is_empty() {
                        let _ = l.reply.send(Reply::Text(out));
                    }
                    let finish = match generation.stop {
                        _ if hit => "stop",
                        StopReason::EndOfGeneration | StopReason::Stopped => "stop",
                        StopReason::MaxTokens | StopReason::ContextFull => "length",
                    };
                    self.finish(&mut l, finish);
                }
            });
            for id in gone {
                batch.cancel(id);
                live.remove(&id);
            }
            if let Err(e) = stepped {
                // An internal failure: fail every request and start afresh.
                for (_, l) in live.drain() {
                    let _ = l.reply.send(Reply::Failed {
                        status: 500,
                        message: format!("generation failed: {e}"),
                    });
                }
                batch = Batch::new(self.decoder, self.tokenizer, self.batch);
            }
        }
    }

    /// Tokenize a job's prompt, run it and add it to the batch.
    fn admit(&self, batch: &mut Batch, job: &Job) -> Result<(RequestId, usize)> {
        let adapters = self
            .models
            .get(&job.model)
            .ok_or_else(|| Error::Invalid(format!("no model named '{}'", job.model)))?;
        let prompt = match &job.prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true)?,
            Prompt::Chat(m) => match self.template {
                Some(t) => t.encode(self.tokenizer, m, true)?,
                None => {
                    return Err(Error::Invalid(
                        "this model has no chat template: use /v1/completions".into(),
                    ));
                }
            },
        };
        let n = prompt.len();
        Ok((batch.add(&prompt, adapters.clone(), job.opts.clone())?, n))
    }

    fn finish(&self, l: &mut Live, finish: &'static str) {
        let _ = l.reply.send(Reply::Done {
            finish,
            usage: l.usage,
        });
        (self.log)(&format!(
            "{} {}+{} tokens {:.2} s {finish}",
            l.model,
            l.usage.prompt_tokens,
            l.usage.completion_tokens,
            l.started.elapsed().as_secs_f64()
        ));
    }
}

/// Holds back text that may be the start of a stop sequence, and cuts the
/// text at the first stop sequence.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    /// A filter for `stops` (none: text passes straight through).
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops,
            held: String::new(),
        }
    }

    /// Add `text`; returns the text now safe to send, and whether a stop
    /// sequence was reached (the text before it is returned, nothing after).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_owned(), false);
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest end of `held` that begins some stop sequence.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_owned();
        self.held.drain(..keep);
        (out, false)
    }

    /// Text still held (the generation ended without reaching a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_sequences_cut_the_text_and_hold_back_partial_matches() {
        let mut f = StopFilter::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(f.push("Hello"), ("Hello".into(), false));
        assert_eq!(
            f.push(" wor\n"),
            (" wor".into(), false),
            "a lone newline may start a stop"
        );
        assert_eq!(f.push("ld"), ("\nld".into(), false));
        assert_eq!(f.push(" E"), (" ".into(), false));
        assert_eq!(f.push("NDING"), (String::new(), true));
        let mut f = StopFilter::new(vec!["é!".into()]);
        assert_eq!(f.push("caf"), ("caf".into(), false));
        assert_eq!(f.push("é"), (String::new(), false));
        assert_eq!(f.finish(), "é");
        let mut none = StopFilter::new(vec![]);
        assert_eq!(none.push("a\n\nb"), ("a\n\nb".into(), false));
    }
}
