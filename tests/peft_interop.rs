//! Hugging Face PEFT adapters in and out, against the real model and an
//! adapter saved by PyPI's `peft` (tests/fixtures/peft/make_fixture.py made
//! the fixture and the logits peft computed with it).

mod common;

use edgetune::export::gguf_lora;
use edgetune::export::peft::{self, HfLayout};
use edgetune::peft::AdapterWeights;
use serde_json::Value;

use common::{floats, ids, last_logits, open, root};

fn fixture() -> Value {
    let p = root().join("tests/fixtures/peft/smollm2-lora.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn a_peft_adapter_imports_and_reproduces_peft_logits() {
    let Some(model) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let fx = fixture();
    let layout = HfLayout::of(&model).unwrap();
    let dir = root().join("tests/fixtures/peft/smollm2-lora");
    let lora = peft::read(&dir, &layout).unwrap();
    lora.check_base(model.file()).unwrap();
    assert_eq!((lora.rank, lora.pairs.len()), (2, 14));
    let scale = fx["scaling"].as_f64().unwrap();
    assert!(
        (f64::from(lora.scale()) - scale).abs() < 1e-6,
        "rsLoRA scale {}",
        lora.scale()
    );

    let input = ids(&fx["input_ids"]);
    let base = last_logits(&model, None, &input);
    let adapted = last_logits(&model, Some(AdapterWeights::new(&lora, 1.0)), &input);
    let check = ids(&fx["last"]["ids"]);
    let (want_base, want) = (floats(&fx["last"]["base"]), floats(&fx["last"]["adapted"]));
    let mut worst = 0.0f64;
    let mut moved = 0.0f64;
    for (k, &id) in check.iter().enumerate() {
        let (b, a) = (
            f64::from(base[id as usize]),
            f64::from(adapted[id as usize]),
        );
        // The adapter's effect, ours against peft's: what a wrong name,
        // orientation, row order or scale would change.
        let err = ((a - b) - (want[k] - want_base[k])).abs();
        worst = worst.max(err);
        moved = moved.max((want[k] - want_base[k]).abs());
        assert!(
            (a - want[k]).abs() < 0.03,
            "token {id}: {a} vs peft {}",
            want[k]
        );
    }
    eprintln!(
        "adapter effect on {} logits up to {moved:.3}; ours within {worst:.1e} of peft's",
        check.len()
    );
    assert!(
        moved > 0.5,
        "the fixture adapter must move the logits visibly"
    );
    assert!(
        worst < 0.02,
        "adapter effect differs from peft's by {worst}"
    );
}

#[test]
fn an_adapter_exported_to_peft_reimports_identically() {
    let Some(model) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let layout = HfLayout::of(&model).unwrap();
    let src = peft::read(&root().join("tests/fixtures/peft/smollm2-lora"), &layout).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Through GGUF (what training writes), out to PEFT, and back.
    let gguf = tmp.path().join("adapter.gguf");
    gguf_lora::write(&gguf, &src, false).unwrap();
    let from_gguf = gguf_lora::read(&gguf).unwrap();
    let out = tmp.path().join("peft");
    peft::write(&out, &from_gguf, &layout).unwrap();
    let back = peft::read(&out, &layout).unwrap();
    assert_eq!(back.rank, src.rank);
    assert!((back.scale() - src.scale()).abs() < 1e-6);
    assert_eq!(back.pairs, src.pairs, "pairs changed on the round trip");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([0, 29]));
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
}

#[test]
fn unsupported_peft_configs_are_refused_by_field() {
    let Some(model) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let layout = HfLayout::of(&model).unwrap();
    let src = root().join("tests/fixtures/peft/smollm2-lora");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    for (field, value, says) in [
        ("use_dora", serde_json::json!(true), "use_dora"),
        ("peft_type", serde_json::json!("IA3"), "peft_type"),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 4}),
            "rank_pattern",
        ),
        ("r", serde_json::json!(4), "rank r=4"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg.clone();
        c[field] = value;
        std::fs::write(tmp.path().join(peft::CONFIG_FILE), c.to_string()).unwrap();
        std::fs::copy(
            src.join(peft::WEIGHTS_FILE),
            tmp.path().join(peft::WEIGHTS_FILE),
        )
        .unwrap();
        let err = peft::read(tmp.path(), &layout).unwrap_err().to_string();
        assert!(err.contains(says), "{field}: {err}");
    }
}
