//! The wgpu device: adapter selection, device creation with the adapter's
//! full limits and optional features, the pipeline cache, buffers, and
//! dispatch recording.

use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// How to pick and set up the GPU.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Adapter to use: a case-insensitive part of its name, or its index in
    /// [`list_adapters`]. `None`: `$EDGETUNE_ADAPTER`, else the best one.
    pub adapter: Option<String>,
    /// Whether a software adapter (a CPU driver such as Mesa's lavapipe) may
    /// be chosen without being named. `--device gpu` allows it; `auto` does not.
    pub allow_software: bool,
    /// Largest storage binding to use (bytes); `None`: the device's limit.
    /// Lower values force tensor splitting (tests use this).
    pub max_binding: Option<u64>,
    /// Leave out the optional fast paths (f16, subgroups) even where the
    /// adapter has them: the baseline WGSL path only.
    pub baseline_only: bool,
    /// Keep KV caches in f16 (half the memory; needs `shader-f16`, else
    /// opening fails with an error that says so).
    pub kv_f16: bool,
}

/// One adapter as `edgetune info --devices` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    /// Position in the list (usable as `--gpu-adapter N`).
    pub index: usize,
    /// The driver's name for the device.
    pub name: String,
    /// `Vulkan`, `Metal`, `Dx12` or `Gl`.
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` (software) or `Other`.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Whether it is a software rasterizer running on the CPU.
    pub software: bool,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
    /// Workgroup shared memory, in bytes.
    pub max_workgroup_storage: u32,
    /// Invocations per workgroup.
    pub max_invocations: u32,
    /// Optional features edgetune can use that the adapter has.
    pub features: Vec<String>,
}

/// Adapter kinds, best first.
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// The optional features edgetune's kernels use.
const OPTIONAL: [(wgpu::Features, &str); 3] = [
    (wgpu::Features::SHADER_F16, "shader-f16"),
    (wgpu::Features::SUBGROUP, "subgroups"),
    (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
];

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    // GL has no storage buffers of useful size; the primary backends only.
    desc.backends = wgpu::Backends::PRIMARY;
    wgpu::Instance::new(desc)
}

/// Adapters in edgetune's order of preference (hardware before software).
fn adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut list = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    list.sort_by_key(|a| rank(a.get_info().device_type));
    list
}

fn summary(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let limits = a.limits();
    let features = a.features();
    AdapterSummary {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        software: info.device_type == wgpu::DeviceType::Cpu,
        max_storage_binding: limits.max_storage_buffer_binding_size,
        max_buffer: limits.max_buffer_size,
        max_workgroup_storage: limits.max_compute_workgroup_storage_size,
        max_invocations: limits.max_compute_invocations_per_workgroup,
        features: OPTIONAL
            .iter()
            .filter(|(f, _)| features.contains(*f))
            .map(|(_, n)| n.to_string())
            .collect(),
    }
}

/// Every adapter wgpu finds, best first.
pub fn list_adapters() -> Vec<AdapterSummary> {
    adapters(&instance())
        .iter()
        .enumerate()
        .map(|(i, a)| summary(i, a))
        .collect()
}

/// A GPU ready to run kernels: device, queue, limits, and the compiled
/// pipelines (compiled once per process and shape).
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    summary: AdapterSummary,
    features: wgpu::Features,
    max_binding: u64,
    kv: super::ops::KvFormat,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// The cache key of each pipeline, by address: names dispatches in profiles.
    names: Mutex<HashMap<usize, Arc<str>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.summary.name)
            .finish()
    }
}

/// Storage buffers are read and written by kernels and copied in and out.
pub(crate) const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl GpuContext {
    /// Open the adapter `opts` asks for.
    pub fn new(opts: &GpuOptions) -> Result<Arc<GpuContext>> {
        let instance = instance();
        let list = adapters(&instance);
        if list.is_empty() {
            return Err(Error::Gpu(
                "no GPU adapter found (Vulkan, Metal or DX12); on Linux without a GPU, \
                 install mesa-vulkan-drivers for the software one"
                    .into(),
            ));
        }
        let wanted = opts
            .adapter
            .clone()
            .or_else(|| std::env::var("EDGETUNE_ADAPTER").ok())
            .filter(|s| !s.trim().is_empty());
        let adapter = match &wanted {
            Some(name) => {
                let needle = name.trim().to_lowercase();
                let by_index = needle.parse::<usize>().ok().and_then(|i| list.get(i));
                by_index
                    .or_else(|| {
                        list.iter()
                            .find(|a| a.get_info().name.to_lowercase().contains(&needle))
                    })
                    .ok_or_else(|| {
                        let names: Vec<String> = list
                            .iter()
                            .enumerate()
                            .map(|(i, a)| format!("{i}: {}", a.get_info().name))
                            .collect();
                        Error::Gpu(format!(
                            "no GPU adapter matches {name:?}; adapters: {}",
                            names.join(", ")
                        ))
                    })?
            }
            None => {
                let best = &list[0];
                if best.get_info().device_type == wgpu::DeviceType::Cpu && !opts.allow_software {
                    return Err(Error::Gpu(format!(
                        "only a software adapter ({}) is present; ask for it with --device gpu \
                         or --gpu-adapter",
                        best.get_info().name
                    )));
                }
                best
            }
        };
        let index = list
            .iter()
            .position(|a| std::ptr::eq(a, adapter))
            .unwrap_or(0);
        let summary = summary(index, adapter);
        let mut features = wgpu::Features::empty();
        if !opts.baseline_only {
            for (f, _) in OPTIONAL {
                if adapter.features().contains(f) {
                    features |= f;
                }
            }
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("edgetune"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Gpu(format!("cannot open {}: {e}", summary.name)))?;
        let device_max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding = opts.max_binding.map_or(device_max, |m| m.min(device_max));
        // Round down to 256 so split points stay aligned for any binding offset.
        let max_binding = (max_binding / 256 * 256).max(256);
        let kv = if opts.kv_f16 {
            if !features.contains(wgpu::Features::SHADER_F16) {
                return Err(Error::Gpu(format!(
                    "an f16 KV cache needs shader-f16, which {} lacks{}",
                    summary.name,
                    if opts.baseline_only {
                        " (or was turned off)"
                    } else {
                        ""
                    }
                )));
            }
            super::ops::KvFormat::F16
        } else {
            super::ops::KvFormat::F32
        };
        Ok(Arc::new(GpuContext {
            device,
            queue,
            summary,
            features,
            max_binding,
            kv,
            pipelines: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
        }))
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.summary
    }

    /// Largest storage binding kernels are given (bytes).
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// How sessions on this device store their KV caches.
    pub fn kv_format(&self) -> super::ops::KvFormat {
        self.kv
    }

    /// Whether the device has native f16 arithmetic enabled.
    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// Whether subgroup operations are enabled.
    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }

    /// The compute pipeline for entry point `entry` of the WGSL `source`,
    /// compiled on first use and cached under `key`. A shader that fails
    /// validation is an error naming `key`, not a panic.
    pub(crate) fn pipeline(
        &self,
        key: &str,
        entry: &str,
        source: impl FnOnce() -> String,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let cache_key = format!("{key}::{entry}");
        if let Some(p) = self
            .pipelines
            .lock()
            .expect("pipeline cache")
            .get(&cache_key)
        {
            return Ok(p.clone());
        }
        let source = source();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(key),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!(
                "shader {key} ({entry}) failed to build: {e}"
            )));
        }
        let pipeline = Arc::new(pipeline);
        self.names
            .lock()
            .expect("pipeline names")
            .insert(Arc::as_ptr(&pipeline) as usize, cache_key.clone().into());
        self.pipelines
            .lock()
            .expect("pipeline cache")
            .insert(cache_key, pipeline.clone());
        Ok(pipeline)
    }

    /// A zeroed storage buffer of at least `bytes` (rounded up to 16).
    pub(crate) fn storage(&self, bytes: u64, label: &str) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(16),
            usage: STORAGE,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer holding `bytes` (padded with zeros to a multiple of
    /// 16), copied once from where they lie (the model's memory map).
    pub(crate) fn upload(&self, bytes: &[u8], label: &str) -> wgpu::Buffer {
        let size = (bytes.len() as u64).max(16).next_multiple_of(16);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: STORAGE,
            mapped_at_creation: true,
        });
        {
            let mut view = buffer
                .slice(..)
                .get_mapped_range_mut()
                .expect("a buffer mapped at creation is mappable");
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        buffer.unmap();
        buffer
    }

    /// A uniform buffer holding `value`.
    pub(crate) fn uniform<T: bytemuck::Pod>(&self, value: &T, label: &str) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::bytes_of(value),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// A dispatch of `pipeline` over `groups` workgroups with `bindings` at
    /// binding indices 0, 1, … of group 0.
    pub(crate) fn dispatch(
        &self,
        pipeline: &Arc<wgpu::ComputePipeline>,
        bindings: &[wgpu::BindingResource<'_>],
        groups: [u32; 3],
    ) -> Dispatch {
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: r.clone(),
            })
            .collect();
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        });
        let name = self
            .names
            .lock()
            .expect("pipeline names")
            .get(&(Arc::as_ptr(pipeline) as usize))
            .cloned()
            .unwrap_or_else(|| "?".into());
        Dispatch {
            pipeline: pipeline.clone(),
            bind_group,
            groups,
            name,
        }
    }

    /// Record `dispatches` in order into one compute pass of `encoder`.
    pub(crate) fn record(encoder: &mut wgpu::CommandEncoder, dispatches: &[Dispatch]) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        for d in dispatches {
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
        }
    }

    /// A new command encoder.
    pub(crate) fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }

    /// Submit `encoder`, having it also copy `bytes` of `src` from `offset`
    /// into a staging buffer, wait, and return those bytes.
    pub(crate) fn submit_and_read(
        &self,
        encoder: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<u8>> {
        let staging = self.staging(bytes);
        self.submit_and_read_via(encoder, src, offset, bytes, &staging)
    }

    /// A buffer the host can map to read `bytes` copied from the device.
    pub(crate) fn staging(&self, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size: bytes.next_multiple_of(4).max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// [`GpuContext::submit_and_read`] through a staging buffer the caller
    /// keeps (made by [`GpuContext::staging`], at least `bytes` long): a
    /// generation loop reads its token back without allocating.
    pub(crate) fn submit_and_read_via(
        &self,
        mut encoder: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
        staging: &wgpu::Buffer,
    ) -> Result<Vec<u8>> {
        let size = bytes.next_multiple_of(4).max(4);
        encoder.copy_buffer_to_buffer(src, offset, staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let slice = staging.slice(..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("the read-back was dropped".into()))?
            .map_err(|e| Error::Gpu(format!("cannot read GPU results: {e}")))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("cannot read GPU results: {e}")))?[..bytes as usize]
            .to_vec();
        staging.unmap();
        Ok(data)
    }

    /// Submit `encoder` and wait for the device to finish it.
    pub(crate) fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.queue.submit([encoder.finish()]);
        self.wait()
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu(format!("the GPU did not finish: {e}")))
    }

    /// Read `n` f32 values of `src` from element `offset`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn read_f32(&self, src: &wgpu::Buffer, offset: usize, n: usize) -> Result<Vec<f32>> {
        let bytes = self.submit_and_read(self.encoder(), src, offset as u64 * 4, n as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// One recorded kernel launch: pipeline, bound buffers, workgroup counts.
pub(crate) struct Dispatch {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    groups: [u32; 3],
    /// The kernel's name (its pipeline cache key).
    pub(crate) name: Arc<str>,
}

/// Workgroups to cover `n` groups' worth of work when one dimension allows
/// at most 65 535: `(x, y, 1)` with `x · y ≥ n`. Kernels compute their linear
/// group as `wid.x + wid.y · nwg.x` and return past `n`.
pub(crate) fn groups_1d(n: u32) -> [u32; 3] {
    const MAX: u32 = 65_535;
    if n <= MAX {
        [n.max(1), 1, 1]
    } else {
        let y = n.div_ceil(MAX);
        [n.div_ceil(y), y, 1]
    }
}
