//! `edgetune serve`: an OpenAI-compatible HTTP server on localhost, with
//! every adapter of a folder live at once on one base model. A request's
//! `model` field names the adapter (or the base); requests with different
//! adapters are decoded together in one batch ([`crate::infer::Batch`]),
//! with batch-invariant products so each gets the tokens it would alone.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with
//! `"stream": true` as server-sent events), `GET /v1/models`, `GET /health`.

mod engine;
mod http;
pub mod openai;

pub use engine::{Reply, StopFilter};
pub use openai::Limits;

use crate::backend::cpu::CpuDecoder;
use crate::infer::BatchOptions;
use crate::peft::AdapterWeights;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::{Error, Result};
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// How [`serve`] runs.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Requests decoded together, and the products they use.
    pub batch: BatchOptions,
    /// Request limits.
    pub limits: Limits,
    /// Most requests waiting for a place in the batch; more are refused
    /// with 503 until some finish.
    pub max_waiting: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            batch: BatchOptions::default(),
            max_waiting: 256,
            limits: Limits {
                completion_max_tokens: 16,
                max_tokens: 512,
            },
        }
    }
}

/// What [`serve`] serves: the base model under `base_name`, and each
/// adapter under its own name.
pub struct Models<'d, 'm> {
    /// The base model on the CPU.
    pub decoder: &'d CpuDecoder<'m>,
    /// Its tokenizer.
    pub tokenizer: &'d Tokenizer,
    /// Its chat template (`None`: chat requests are refused).
    pub template: Option<&'d ChatTemplate>,
    /// The name that selects no adapter.
    pub base_name: String,
    /// Adapters by name.
    pub adapters: Vec<(String, Arc<AdapterWeights>)>,
}

impl Models<'_, '_> {
    /// The names requests select, the base's first; an error when two are
    /// the same.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names = vec![self.base_name.clone()];
        for (name, _) in &self.adapters {
            if names.contains(name) {
                return Err(Error::Invalid(format!(
                    "two models are named '{name}': names must be unique (see --base-name)"
                )));
            }
            names.push(name.clone());
        }
        Ok(names)
    }
}

/// Seconds open connections get to finish once the server stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serve `models` on `listener` until `stop()` returns true; `log` gets a
/// line per finished request. Returns when the server has shut down (or
/// [`SHUTDOWN_GRACE`] after, leaving slow connections to close by
/// themselves).
pub fn serve(
    models: Models<'_, '_>,
    listener: TcpListener,
    opts: &ServeOptions,
    stop: &(dyn Fn() -> bool + Sync),
    log: &(dyn Fn(&str) + Sync),
) -> Result<()> {
    let names = models.names()?;
    let mut by_name: HashMap<String, Vec<Arc<AdapterWeights>>> = models
        .adapters
        .into_iter()
        .map(|(name, a)| (name, vec![a]))
        .collect();
    by_name.insert(models.base_name, Vec::new());
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("<listener>", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(format!("<listener {addr}>"), e))?;
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let shared = Arc::new(http::Shared {
        jobs: jobs_tx,
        limits: opts.limits,
        names,
        counter: AtomicU64::new(0),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::Builder::new()
        .name("edgetune-http".into())
        .spawn(move || -> std::io::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(l, http::router(shared))
                    .with_graceful_shutdown(async {
                        let _ = shutdown_rx.await;
                    })
                    .await
            })
        })
        .map_err(|e| Error::io("<http thread>", e))?;
    let engine = engine::Engine {
        decoder: models.decoder,
        tokenizer: models.tokenizer,
        template: models.template,
        models: &by_name,
        batch: opts.batch,
        max_waiting: opts.max_waiting,
        log,
    };
    let ran = engine.run(&jobs_rx, &|| stop() || server.is_finished());
    drop(jobs_rx);
    let _ = shutdown_tx.send(());
    let t = std::time::Instant::now();
    while !server.is_finished() && t.elapsed() < SHUTDOWN_GRACE {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ran?;
    if !server.is_finished() {
        return Ok(());
    }
    server
        .join()
        .map_err(|_| Error::Invalid("the HTTP thread panicked".into()))?
        .map_err(|e| Error::io(format!("<http server on {addr}>"), e))
}
