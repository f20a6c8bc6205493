//! Folding adapters into the base model: the merged GGUF opens, computes
//! what base + adapter computes within the error of its tensor type, and
//! leaves every tensor the adapter does not touch byte for byte.

mod common;

use edgetune::export::merge::{MergeType, logit_error, merge};
use edgetune::export::peft::{self, HfLayout};
use edgetune::model::Model;
use edgetune::quant::GgmlType;
use std::ops::ControlFlow;

use common::{open, root};

#[test]
fn a_merged_model_matches_base_plus_adapter_within_its_type_error() {
    let Some(model) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let lora = peft::read(
        &root().join("tests/fixtures/peft/smollm2-lora"),
        &HfLayout::of(&model).unwrap(),
    )
    .unwrap();
    let adapters = vec![(lora, 1.0f32)];
    let prompts = vec![
        vec![504, 3575, 282, 4649, 314],
        vec![1, 2, 3, 4, 5, 6, 7, 8],
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut errors = Vec::new();
    for (ty, want) in [
        (MergeType::F16, GgmlType::F16),
        (MergeType::Same, GgmlType::Q4_1),
    ] {
        let out = tmp.path().join(format!("{want:?}.gguf"));
        let r = merge(&model, &adapters, ty, &out, &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(r.merged.len(), 14);
        assert!(r.merged.iter().all(|(_, t)| *t == want));
        let merged = Model::open(&out).unwrap();
        let (base, folded) = (model.file(), merged.file());
        assert_eq!(base.tensors().len(), folded.tensors().len());
        for t in base.tensors() {
            let m = folded.tensor(&t.name).unwrap();
            if !r.merged.iter().any(|(n, _)| n == &t.name) {
                assert_eq!(
                    base.tensor_data(t),
                    folded.tensor_data(m),
                    "{} changed",
                    t.name
                );
            }
        }
        let (worst, mean) = logit_error(&model, &adapters, &merged, &prompts).unwrap();
        eprintln!("{want:?}: max |Δlogit| {worst:.4}, mean {mean:.5}");
        errors.push(worst);
    }
    // f16 keeps the update; re-quantizing to Q4_1 loses part of it.
    assert!(errors[0] < 0.05, "f16 merge error {}", errors[0]);
    assert!(
        errors[1] > 5.0 * errors[0],
        "re-quantizing should cost more: {errors:?}"
    );

    // Cancelling writes nothing.
    let out = tmp.path().join("cancelled.gguf");
    let r = merge(&model, &adapters, MergeType::F16, &out, &mut |_, _| {
        ControlFlow::Break(())
    });
    assert!(r.is_err() && !out.exists());
}
