//! The HTTP side of `serve` (axum on a one-thread tokio runtime): routes,
//! handing jobs to the engine, whole responses and server-sent events.

use super::engine::{Reply, Submission};
use super::openai::{ApiError, Head, Job, Kind, Limits, parse_chat, parse_completion};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc::UnboundedReceiver;

/// What the handlers share.
pub struct Shared {
    /// Jobs to the engine.
    pub jobs: std::sync::mpsc::Sender<Submission>,
    /// Request limits.
    pub limits: Limits,
    /// Model names: the base's first, then the adapters'.
    pub names: Vec<String>,
    /// Responses so far (for ids).
    pub counter: AtomicU64,
    /// Unix seconds the server started (the models' `created`).
    pub started: u64,
}

/// The server's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &e.body())
}

fn unavailable(message: &str) -> Response {
    error(ApiError::status(503, message))
}

async fn not_found() -> Response {
    error(ApiError::status(
        404,
        "no such endpoint: this server has /v1/completions, /v1/chat/completions, /v1/models and /health",
    ))
}

async fn method_not_allowed() -> Response {
    error(ApiError::status(
        405,
        "method not allowed: completions take POST, /v1/models and /health take GET",
    ))
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn models(State(st): State<Arc<Shared>>) -> Response {
    let data: Vec<Value> = st
        .names
        .iter()
        .map(|n| json!({"id": n, "object": "model", "created": st.started, "owned_by": "edgetune"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn completions(State(st): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_completion(&body, &st.limits) {
        Ok(job) => run(st, job, Kind::Completion).await,
        Err(e) => error(e),
    }
}

async fn chat(State(st): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_chat(&body, &st.limits) {
        Ok(job) => run(st, job, Kind::Chat).await,
        Err(e) => error(e),
    }
}

async fn run(st: Arc<Shared>, mut job: Job, kind: Kind) -> Response {
    if job.model.is_empty() {
        job.model = st.names[0].clone();
    }
    if !st.names.contains(&job.model) {
        return error(ApiError {
            status: 404,
            message: format!(
                "no model named '{}'; this server has: {}",
                job.model,
                st.names.join(", ")
            ),
            param: Some("model".into()),
            code: Some("model_not_found"),
        });
    }
    let head = Head::new(kind, &job.model, st.counter.fetch_add(1, Ordering::Relaxed));
    let (stream, stream_usage) = (job.stream, job.stream_usage);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if st.jobs.send(Submission { job, reply: tx }).is_err() {
        return unavailable("the server is shutting down");
    }
    match rx.recv().await {
        Some(Reply::Started { .. }) => {}
        Some(Reply::Failed { status, message }) => {
            return error(ApiError::status(status, message));
        }
        _ => return unavailable("the server is shutting down"),
    }
    if stream {
        return events(head, rx, stream_usage);
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Reply::Text(t)) => text.push_str(&t),
            Some(Reply::Done { finish, usage }) => {
                return json_response(StatusCode::OK, &head.response(&text, finish, usage));
            }
            Some(Reply::Started { .. }) => {}
            Some(Reply::Failed { status, message }) => {
                return error(ApiError::status(status, message));
            }
            None => return unavailable("the server is shutting down"),
        }
    }
}

/// Where a stream is.
struct StreamState {
    rx: UnboundedReceiver<Reply>,
    head: Head,
    first: bool,
    done: bool,
    usage: bool,
}

/// A server-sent event stream of chunks, ended by `data: [DONE]`.
fn events(head: Head, rx: UnboundedReceiver<Reply>, usage: bool) -> Response {
    let state = StreamState {
        rx,
        first: head.kind == Kind::Chat,
        head,
        done: false,
        usage,
    };
    let data = |v: &Value| format!("data: {v}\n\n");
    let stream = futures_util::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        if s.first {
            // A chat stream opens with the assistant's role.
            s.first = false;
            let chunk = data(&s.head.chunk("", true, None, None));
            return Some((Ok::<_, Infallible>(chunk), s));
        }
        let out = match s.rx.recv().await {
            Some(Reply::Text(t)) => data(&s.head.chunk(&t, false, None, None)),
            Some(Reply::Done { finish, usage }) => {
                s.done = true;
                let mut out = data(&s.head.chunk("", false, Some(finish), None));
                if s.usage {
                    out.push_str(&data(&s.head.usage_chunk(usage)));
                }
                out.push_str("data: [DONE]\n\n");
                out
            }
            Some(Reply::Started { .. }) => String::new(),
            Some(Reply::Failed { status, message }) => {
                s.done = true;
                let e = ApiError::status(status, message);
                data(&e.body())
            }
            None => return None,
        };
        Some((Ok(out), s))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| unavailable("could not start the stream"))
}
