//! Choosing a token from logits: greedy, or a draw from the tempered,
//! truncated distribution with a uniform number the caller supplies (so the
//! random stream lives with the caller, and a GPU needs only that number).

/// How to choose the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick {
    /// The largest logit (the first, on ties).
    Greedy,
    /// A draw from softmax(logits / temperature) restricted to the `top_k`
    /// largest (`0`: all) and then to the nucleus of mass `top_p`, using the
    /// uniform number `u` in `[0, 1)`.
    Draw {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Keep only the `top_k` most likely tokens (`0`: all).
        top_k: usize,
        /// Keep the smallest set of tokens whose probability reaches `top_p`.
        top_p: f32,
        /// The uniform number that decides the draw.
        u: f64,
    },
}

/// Index of the largest logit (the first, on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Apply `pick` to one position's logits on the host: candidates sorted by
/// logit, nucleus as the shortest sorted prefix reaching `top_p`, inverse
/// CDF in that order. `scratch` is reused between calls.
pub fn draw_sorted(logits: &[f32], pick: &Pick, scratch: &mut Vec<(u32, f32)>) -> u32 {
    let Pick::Draw {
        temperature: t,
        top_k,
        top_p,
        u,
    } = *pick
    else {
        return argmax(logits);
    };
    let c = scratch;
    c.clear();
    c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
    let k = if top_k == 0 {
        c.len()
    } else {
        top_k.min(c.len())
    };
    if k < c.len() {
        c.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        c.truncate(k);
    }
    c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = c[0].1;
    let mut sum = 0.0f64;
    for (_, l) in c.iter_mut() {
        // Divide (not multiply by 1/t): a tiny t must not give 0·∞ = NaN.
        *l = ((*l - max) / t).exp();
        sum += *l as f64;
    }
    // Nucleus: the shortest prefix whose mass reaches top_p.
    let mut keep = c.len();
    if top_p < 1.0 {
        let mut acc = 0.0f64;
        for (i, (_, p)) in c.iter().enumerate() {
            acc += *p as f64 / sum;
            if acc >= top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    let mass: f64 = c[..keep].iter().map(|&(_, p)| p as f64).sum();
    let mut r = u * mass;
    for &(id, p) in &c[..keep] {
        r -= p as f64;
        if r <= 0.0 {
            return id;
        }
    }
    c[keep - 1].0
}
