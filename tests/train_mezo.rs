//! Zeroth-order training (MeZO) through the library's `train`: the plan
//! holds no gradients or moments, steps run forward passes only, and a
//! run stopped and resumed writes the uninterrupted run's adapter byte for
//! byte (the direction of each step is regenerated from its seed).

mod common;

use edgetune::graph::Target;
use edgetune::model::Model;
use edgetune::peft::lora::{LayerSelection, Lora};
use edgetune::tokenizer::Tokenizer;
use edgetune::train::budget::{StepShape, plan_step};
use edgetune::train::{Duration, Optimizer, TrainConfig, TrainEvent, TrainRequest, train};
use std::ops::ControlFlow;
use std::path::Path;

fn config() -> TrainConfig {
    let mut c = TrainConfig {
        optimizer: Optimizer::Mezo { eps: 1e-3 },
        lr: 1e-3,
        duration: Duration::Steps(6),
        batch: 2,
        seq: 48,
        save_every: 1,
        seed: 7,
        ..TrainConfig::default()
    };
    c.lora.rank = 4;
    c.lora.layers = LayerSelection::Last(4);
    c.lora.targets = vec![Target::AttnQ, Target::AttnV, Target::FfnDown];
    c.lora.dropout = 0.1;
    c
}

fn request<'a>(
    model: &'a Model,
    tok: &'a Tokenizer,
    data: &'a Path,
    out: &'a Path,
    resume: bool,
) -> TrainRequest<'a> {
    TrainRequest {
        model,
        tokenizer: tok,
        template: None,
        data,
        eval_data: None,
        out,
        config: config(),
        threads: 2,
        device: Default::default(),
        resume,
    }
}

#[test]
fn mezo_trains_in_inference_memory_and_resumes_exactly() {
    let Some(path) = common::model_file("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let model = Model::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let data = common::root().join("examples/data/notes.txt");
    let dir = tempfile::tempdir().unwrap();
    let (whole, stopped) = (dir.path().join("whole"), dir.path().join("stopped"));

    let mut planned = None;
    let mut steps = Vec::new();
    let summary = train(&request(&model, &tok, &data, &whole, false), &mut |e| {
        match e {
            TrainEvent::Planned { memory, .. } => planned = Some(*memory),
            TrainEvent::Step {
                loss,
                grad_norm,
                skipped,
                ..
            } => {
                assert!(skipped.is_none(), "{skipped:?}");
                steps.push((*loss, *grad_norm));
            }
            _ => {}
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(summary.steps, 6);
    assert!(steps.iter().all(|(l, g)| l.is_finite() && g.is_finite()));
    assert!(
        steps.iter().any(|&(_, g)| g > 0.0),
        "the projected gradients are not all zero"
    );

    // The plan: no backward pass, so far fewer activations than AdamW's.
    let memory = planned.unwrap();
    assert!(memory.forward_only && memory.recomputed_layers == 0);
    let lora = Lora::new(config().lora, model.spec().layers.len()).unwrap();
    let shape = |zeroth_order| StepShape {
        spec: model.spec(),
        method: &lora,
        seq: 48,
        threads: 2,
        data_bytes: 0,
        keep_best: false,
        gpu: false,
        zeroth_order,
        fast: false,
    };
    let adamw = plan_step(&shape(false), 2, 1, 0).unwrap().report;
    let mezo = plan_step(&shape(true), 2, 1, 0).unwrap().report;
    assert_eq!(mezo.activations, memory.activations);
    assert!(
        mezo.activations * 4 < adamw.activations && mezo.adapter < adamw.adapter,
        "MeZO {mezo:?} vs AdamW {adamw:?}"
    );

    // Stop after step 3 (a checkpoint is written), then resume.
    let stop = train(
        &request(&model, &tok, &data, &stopped, false),
        &mut |e| match e {
            TrainEvent::Step { step: 3, .. } => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        },
    );
    assert!(matches!(stop, Err(edgetune::Error::Cancelled)), "{stop:?}");
    let resumed = train(&request(&model, &tok, &data, &stopped, true), &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(resumed.steps, 6);
    let a = std::fs::read(whole.join("adapter.gguf")).unwrap();
    let b = std::fs::read(stopped.join("adapter.gguf")).unwrap();
    assert!(
        a == b,
        "the resumed run's adapter differs from the uninterrupted run's"
    );
    // And training moved the adapter: its B matrices are no longer zero.
    let file = edgetune::export::gguf_lora::read(&whole.join("adapter.gguf")).unwrap();
    assert!(file.pairs.iter().any(|p| p.b.iter().any(|&v| v != 0.0)));
}
