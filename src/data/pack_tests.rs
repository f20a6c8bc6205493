//! Tests of packing and splitting, on hand-made datasets (no model needed).

use std::collections::HashMap;

use super::*;

/// A dataset of examples with lengths `lens`; example `k`'s tokens are
/// `k * 1000 + i`, so every token is unique, and every other token from the
/// third on is trainable.
fn synthetic(lens: &[usize]) -> Dataset {
    let examples = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| Example {
            tokens: (0..n as u32).map(|i| k as u32 * 1000 + i).collect(),
            trainable: (0..n).map(|i| i >= 2 && i % 2 == 0 || i == n - 1).collect(),
            source: format!("ex:{k}"),
        })
        .collect();
    Dataset {
        examples,
        pad_id: 7,
        ..Dataset::default()
    }
}

/// Every trainable (input, target) pair of `ds`, as a count map.
fn expected_targets(ds: &Dataset) -> HashMap<(u32, u32), usize> {
    let mut want = HashMap::new();
    for e in &ds.examples {
        for i in 1..e.tokens.len() {
            if e.trainable[i] {
                *want.entry((e.tokens[i - 1], e.tokens[i])).or_default() += 1;
            }
        }
    }
    want
}

/// Check a batch's invariants; add its (input, target) pairs to `seen`.
fn check_batch(b: &Batch, ds: &Dataset, seen: &mut HashMap<(u32, u32), usize>) {
    let n = b.batch * b.seq;
    for v in [&b.tokens, &b.targets, &b.positions, &b.seg_start] {
        assert_eq!(v.len(), n);
    }
    for row in 0..b.batch {
        let at = |t: usize| row * b.seq + t;
        for t in 0..b.seq {
            let (tok, target, pos, seg) = (
                b.tokens[at(t)],
                b.targets[at(t)],
                b.positions[at(t)] as usize,
                b.seg_start[at(t)] as usize,
            );
            assert!(seg <= t);
            assert_eq!(pos, t - seg, "row {row} t {t}");
            let padding = tok == ds.pad_id && pos == 0 && seg == t && target == IGNORE;
            if padding {
                continue;
            }
            // The segment is one example, whole-prefixed within this row.
            let k = (tok / 1000) as usize;
            let e = &ds.examples[k];
            assert_eq!(tok, e.tokens[pos]);
            assert_eq!(b.tokens[at(seg)], e.tokens[0], "segment starts its example");
            if pos + 1 < e.tokens.len() {
                assert!(t + 1 < b.seq, "example {k} straddles rows");
                assert_eq!(b.tokens[at(t + 1)], e.tokens[pos + 1]);
                assert_eq!(b.seg_start[at(t + 1)] as usize, seg);
            }
            if target != IGNORE {
                assert!(e.trainable[pos + 1]);
                assert_eq!(target, e.tokens[pos + 1]);
                *seen.entry((tok, target)).or_default() += 1;
            } else {
                assert!(pos + 1 == e.tokens.len() || !e.trainable[pos + 1]);
            }
        }
    }
}

#[test]
fn packing_keeps_examples_apart_and_covers_each_epoch_once() {
    let lens = [5, 16, 3, 9, 12, 2, 7, 16, 4, 11, 6, 8, 10, 3];
    let ds = synthetic(&lens);
    let want = expected_targets(&ds);
    let mut p = Packer::new(&ds, 16, 3, 42).unwrap();
    for epoch in 0..3 {
        assert_eq!(
            p.state(),
            PackerState {
                epoch,
                next_example: 0
            }
        );
        let steps = p.steps_per_epoch();
        let mut seen = HashMap::new();
        for step in 0..steps {
            let b = p.next_batch();
            check_batch(&b, &ds, &mut seen);
            assert_eq!(p.state().epoch, epoch + (step + 1 == steps) as u64);
        }
        assert_eq!(seen, want, "epoch {epoch}");
    }

    let evals = eval_batches(&ds, 16, 4);
    let mut seen = HashMap::new();
    for b in &evals {
        check_batch(b, &ds, &mut seen);
    }
    assert_eq!(seen, want);
    // In order, first fit: example 0 (5) then example 2 would not fit after 1 (16).
    assert_eq!(evals[0].tokens[..5], ds.examples[0].tokens[..]);
    assert_eq!(evals[0].seg_start[16], 0);
}

#[test]
fn packing_cuts_examples_longer_than_seq() {
    let ds = synthetic(&[40, 3]);
    let mut p = Packer::new(&ds, 16, 2, 1).unwrap();
    assert_eq!(p.examples_per_epoch(), 4);
    let b = p.next_batch();
    assert!(b.positions.iter().all(|&x| x < 16));
    assert!(Packer::new(&ds, 1, 2, 1).is_err());
    assert!(Packer::new(&ds, 16, 0, 1).is_err());
    assert!(Packer::new(&Dataset::default(), 16, 2, 1).is_err());
}

#[test]
fn packer_resumes_exactly() {
    let ds = synthetic(&[5, 16, 3, 9, 12, 2, 7, 16, 4, 11, 6, 8, 10, 3, 14, 5]);
    let mut a = Packer::new(&ds, 16, 2, 9).unwrap();
    for _ in 0..5 {
        a.next_batch();
    }
    let saved = a.state();
    let json = serde_json::to_string(&saved).unwrap();
    let next: Vec<Batch> = (0..12).map(|_| a.next_batch()).collect();
    assert!(a.state().epoch >= 1, "the run crosses an epoch");

    let mut b = Packer::new(&ds, 16, 2, 9).unwrap();
    b.restore(serde_json::from_str(&json).unwrap()).unwrap();
    let again: Vec<Batch> = (0..12).map(|_| b.next_batch()).collect();
    assert_eq!(next, again);
    assert_eq!(a.state(), b.state());

    let past = PackerState {
        epoch: 0,
        next_example: 1000,
    };
    assert!(b.restore(past).is_err());
    // Another seed gives another order.
    let mut c = Packer::new(&ds, 16, 2, 10).unwrap();
    let mut d = Packer::new(&ds, 16, 2, 9).unwrap();
    assert_ne!(c.next_batch(), d.next_batch());
}

#[test]
fn split_is_deterministic_and_disjoint() {
    let ds = synthetic(&[4; 20]);
    let (t1, e1) = ds.clone().split(0.25, 5);
    let (t2, e2) = ds.clone().split(0.25, 5);
    assert_eq!((t1.len(), e1.len()), (15, 5));
    assert_eq!((&t1, &e1), (&t2, &e2));
    let mut sources: Vec<&str> = t1
        .examples
        .iter()
        .chain(&e1.examples)
        .map(|e| e.source.as_str())
        .collect();
    sources.sort();
    sources.dedup();
    assert_eq!(sources.len(), 20);
    let (_, e3) = ds.clone().split(0.25, 6);
    assert_ne!(e1, e3);

    let two = synthetic(&[4, 4]);
    let (t, e) = two.clone().split(0.01, 0);
    assert_eq!((t.len(), e.len()), (1, 1));
    let (t, e) = two.clone().split(1.0, 0);
    assert_eq!((t.len(), e.len()), (1, 1));
    let (t, e) = two.split(0.0, 0);
    assert_eq!((t.len(), e.len()), (2, 0));
}
