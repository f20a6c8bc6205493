//! Adapters of the other PEFT methods saved by PyPI's `peft`
//! (tests/fixtures/peft/make_methods_fixture.py made them and the logits
//! peft computed with them) give peft's logits in edgetune: DoRA, VeRA,
//! (IA)³, LoHa, LoKr, prompt tuning and prefix tuning on SmolLM2.

mod common;

use edgetune::export::load_adapter_weights;
use serde_json::Value;

use common::{floats, ids, last_logits, open, root};

#[test]
fn peft_adapters_of_every_method_reproduce_peft_s_logits() {
    let Some(model) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    for method in ["dora", "vera", "ia3", "loha", "lokr", "prompt", "prefix"] {
        let dir = root().join(format!("tests/fixtures/peft/smollm2-{method}"));
        let fx: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.with_extension("json")).unwrap())
                .unwrap();
        let adapter = load_adapter_weights(&dir, &model, 1.0).unwrap();
        let input = ids(&fx["input_ids"]);
        let base = last_logits(&model, None, &input);
        let adapted = last_logits(&model, Some(adapter), &input);
        let check = ids(&fx["last"]["ids"]);
        let (want_base, want) = (floats(&fx["last"]["base"]), floats(&fx["last"]["adapted"]));
        let (mut worst, mut moved) = (0.0f64, 0.0f64);
        for (k, &id) in check.iter().enumerate() {
            let (b, a) = (
                f64::from(base[id as usize]),
                f64::from(adapted[id as usize]),
            );
            // The adapter's effect, ours against peft's: what a wrong name,
            // row order, scale or formula would change.
            worst = worst.max(((a - b) - (want[k] - want_base[k])).abs());
            moved = moved.max((want[k] - want_base[k]).abs());
            assert!(
                (a - want[k]).abs() < 0.05,
                "{method}: token {id}: {a} vs peft {}",
                want[k]
            );
        }
        eprintln!("{method}: adapter effect up to {moved:.3}; ours within {worst:.1e} of peft's");
        assert!(
            moved > 0.5,
            "{method}: the fixture must move the logits visibly"
        );
        assert!(
            worst < 0.02,
            "{method}: adapter effect differs from peft's by {worst}"
        );
    }
}
