//! `edgetune info`.

use super::{ModelArgs, emit, print_json, report};
use clap::Args;
use edgetune::Error;
use edgetune::backend::gpu::list_adapters;
use edgetune::gguf::GgufFile;
use edgetune::model::ModelSummary;

/// Arguments of `info`.
#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// List the GPU adapters (with limits and features) instead of a model.
    #[arg(long)]
    devices: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// `info --devices`: every adapter wgpu finds, best first.
fn devices(json: bool) -> Result<(), Error> {
    let list = super::quiet_wayland_probe(list_adapters);
    if json {
        return print_json(&list);
    }
    let mut out = String::new();
    if list.is_empty() {
        report!(
            out,
            "no GPU adapter found (Vulkan, Metal or DX12); edgetune runs on the CPU"
        );
    }
    for a in &list {
        report!(
            out,
            "{}: {} ({}, {}{})",
            a.index,
            a.name,
            a.backend,
            a.device_type,
            if a.software {
                ", software: used only with --device gpu or when named"
            } else {
                ""
            }
        );
        report!(out, "   driver             {}", a.driver);
        report!(
            out,
            "   storage binding    {:.0} MiB (buffer {:.0} MiB)",
            a.max_storage_binding as f64 / 1048576.0,
            a.max_buffer as f64 / 1048576.0
        );
        report!(
            out,
            "   workgroup          {} invocations, {} KiB shared",
            a.max_invocations,
            a.max_workgroup_storage / 1024
        );
        report!(
            out,
            "   features           {}",
            if a.features.is_empty() {
                "-".to_string()
            } else {
                a.features.join(", ")
            }
        );
    }
    emit(&out)
}

pub fn run(a: InfoArgs) -> Result<(), Error> {
    if a.devices {
        return devices(a.json);
    }
    let file = GgufFile::open(a.model.path()?)?;
    let s = ModelSummary::of(&file);
    if a.json {
        return print_json(&s);
    }
    let mut out = String::new();
    report!(
        out,
        "file          {} ({:.1} MB, GGUF v{})",
        s.path,
        s.file_bytes as f64 / 1e6,
        s.gguf_version
    );
    report!(out, "name          {}", s.name.as_deref().unwrap_or("-"));
    report!(
        out,
        "architecture  {}",
        s.architecture.as_deref().unwrap_or("-")
    );
    match &s.unsupported_reason {
        None => report!(out, "supported     yes"),
        Some(r) => report!(out, "supported     no: {r}"),
    }
    report!(
        out,
        "parameters    {:.1} M in {} tensors",
        s.parameters as f64 / 1e6,
        s.tensors
    );
    for (ty, n) in &s.tensor_types {
        report!(
            out,
            "  {ty:<6} {n:>5} tensors  {:>8.1} MB",
            s.tensor_bytes[ty] as f64 / 1e6
        );
    }
    report!(out, "hyper-parameters");
    for (k, v) in &s.hyperparameters {
        report!(out, "  {k:<40} {v}");
    }
    report!(
        out,
        "tokenizer     {} (pre: {}), {} tokens",
        s.tokenizer.as_deref().unwrap_or("-"),
        s.tokenizer_pre.as_deref().unwrap_or("-"),
        s.vocab_size.map_or("-".into(), |n| n.to_string())
    );
    report!(
        out,
        "chat template {}",
        if s.chat_template { "yes" } else { "no" }
    );
    emit(&out)
}
