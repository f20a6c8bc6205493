//! Loss curves as a self-contained SVG: no scripts, fonts or external files,
//! viewable in any browser and embeddable in a report.
//!
//! The plot is 800×450: steps on x, loss on y, both with "nice" ticks (1, 2
//! or 5 times a power of ten). The training loss is a thin polyline; with more
//! than [`SMOOTH_MIN_POINTS`] points a debiased exponential moving average is
//! drawn over it. The eval loss is a line with a dot per evaluation. Points
//! with a non-finite loss are skipped.

use std::fmt::Write;

/// Training series with more points than this also get a smoothed line.
pub const SMOOTH_MIN_POINTS: usize = 50;

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 450.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// EMA decay of the smoothed training line (TensorBoard's default weight).
const EMA_BETA: f64 = 0.9;
const TRAIN_COLOUR: &str = "#1f77b4";
const EVAL_COLOUR: &str = "#d62728";

/// An SVG document plotting `train` and `eval` losses, each `(step, loss)`, under `title`.
pub fn loss_curve_svg(title: &str, train: &[(u64, f32)], eval: &[(u64, f32)]) -> String {
    let train = finite(train);
    let eval = finite(eval);
    let all = || train.iter().chain(&eval);
    let (x_lo, x_hi) = range(all().map(|p| p.0));
    let (y_lo, y_hi) = range(all().map(|p| p.1));
    let xt = Ticks::new(x_lo, x_hi, 8, true);
    let yt = Ticks::new(y_lo, y_hi, 6, false);
    let map = Mapping { x: xt, y: yt };

    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    s.push('\n');
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        WIDTH / 2.0,
        escape_xml(title)
    );
    axes(&mut s, &map);

    if train.is_empty() && eval.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888">no data</text>"##,
            LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
            TOP + (HEIGHT - TOP - BOTTOM) / 2.0
        );
    }
    let smooth = train.len() > SMOOTH_MIN_POINTS;
    if !train.is_empty() {
        let (width, opacity) = if smooth { (1.0, 0.35) } else { (1.5, 1.0) };
        polyline(&mut s, &map, &train, TRAIN_COLOUR, width, opacity, "train");
        if train.len() == 1 {
            dots(&mut s, &map, &train, TRAIN_COLOUR);
        }
    }
    if smooth {
        let ema = ema(&train);
        polyline(&mut s, &map, &ema, TRAIN_COLOUR, 2.0, 1.0, "train-ema");
    }
    if !eval.is_empty() {
        polyline(&mut s, &map, &eval, EVAL_COLOUR, 1.5, 1.0, "eval");
        dots(&mut s, &map, &eval, EVAL_COLOUR);
    }
    legend(&mut s, !train.is_empty(), smooth, !eval.is_empty());
    s.push_str("</svg>\n");
    s
}

/// The points with a finite loss, as f64.
fn finite(points: &[(u64, f32)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| (x as f64, f64::from(y)))
        .collect()
}

/// Min and max of `values`, (0, 1) when there are none.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values
        .fold(None, |acc: Option<(f64, f64)>, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
        .unwrap_or((0.0, 1.0))
}

/// Tick positions covering `[lo, hi]` at a step of 1, 2 or 5 × 10^k.
struct Ticks {
    lo: f64,
    hi: f64,
    step: f64,
}

impl Ticks {
    /// About `target` intervals; `integer` ticks (steps) never go below a step of 1.
    fn new(lo: f64, hi: f64, target: usize, integer: bool) -> Ticks {
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            // A single value: centre it in a small range.
            let pad = if integer {
                1.0
            } else {
                (lo.abs() * 0.1).max(0.1)
            };
            (lo - pad, hi + pad)
        };
        let rough = (hi - lo) / target as f64;
        let mag = 10f64.powf(rough.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|&s| s >= rough)
            .unwrap_or(10.0 * mag);
        let step = if integer { step.max(1.0).round() } else { step };
        Ticks {
            lo: (lo / step).floor() * step,
            hi: (hi / step).ceil() * step,
            step,
        }
    }

    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        let n = ((self.hi - self.lo) / self.step).round() as usize;
        (0..=n).map(move |i| self.lo + i as f64 * self.step)
    }

    /// A tick label with as many decimals as the step needs.
    fn label(&self, v: f64) -> String {
        let decimals = (-self.step.log10().floor()).max(0.0) as usize;
        let s = format!("{v:.decimals$}");
        // "-0.0" reads as a bug on an axis.
        if s.trim_start_matches('-')
            .chars()
            .all(|c| c == '0' || c == '.')
        {
            s.trim_start_matches('-').to_string()
        } else {
            s
        }
    }
}

/// Data coordinates to SVG coordinates.
struct Mapping {
    x: Ticks,
    y: Ticks,
}

impl Mapping {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.lo) / (self.x.hi - self.x.lo) * (WIDTH - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        HEIGHT - BOTTOM - (y - self.y.lo) / (self.y.hi - self.y.lo) * (HEIGHT - TOP - BOTTOM)
    }
}

/// The frame, grid lines, tick labels and axis titles.
fn axes(s: &mut String, m: &Mapping) {
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
    s.push_str(r##"<g stroke="#ddd" stroke-width="1">"##);
    s.push('\n');
    for v in m.x.values() {
        let x = m.px(v);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{y1:.1}"/>"#
        );
    }
    for v in m.y.values() {
        let y = m.py(v);
        let _ = writeln!(
            s,
            r#"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}"/>"#
        );
    }
    s.push_str("</g>\n");
    let _ = writeln!(
        s,
        r##"<rect x="{x0:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#333"/>"##,
        x1 - x0,
        y1 - y0
    );
    s.push_str(r#"<g text-anchor="middle">"#);
    s.push('\n');
    for v in m.x.values() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            m.px(v),
            y1 + 16.0,
            m.x.label(v)
        );
    }
    s.push_str("</g>\n");
    s.push_str(r#"<g text-anchor="end">"#);
    s.push('\n');
    for v in m.y.values() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            x0 - 6.0,
            m.py(v) + 4.0,
            m.y.label(v)
        );
    }
    s.push_str("</g>\n");
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">loss</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
}

fn polyline(
    s: &mut String,
    m: &Mapping,
    pts: &[(f64, f64)],
    colour: &str,
    width: f64,
    opacity: f64,
    class: &str,
) {
    let _ = write!(
        s,
        r#"<polyline class="{class}" fill="none" stroke="{colour}" stroke-width="{width}" stroke-opacity="{opacity}" stroke-linejoin="round" points=""#
    );
    for (i, &(x, y)) in pts.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{:.1},{:.1}", m.px(x), m.py(y));
    }
    s.push_str("\"/>\n");
}

fn dots(s: &mut String, m: &Mapping, pts: &[(f64, f64)], colour: &str) {
    let _ = writeln!(s, r#"<g fill="{colour}">"#);
    for &(x, y) in pts {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="3"/>"#,
            m.px(x),
            m.py(y)
        );
    }
    s.push_str("</g>\n");
}

/// Debiased EMA: `e_t = β·e_{t-1} + (1-β)·y_t`, divided by `1-β^t` so the
/// start is not pulled towards zero.
fn ema(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut e = 0.0;
    let mut w = 1.0;
    pts.iter()
        .map(|&(x, y)| {
            e = EMA_BETA * e + (1.0 - EMA_BETA) * y;
            w *= EMA_BETA;
            (x, e / (1.0 - w))
        })
        .collect()
}

fn legend(s: &mut String, train: bool, smooth: bool, eval: bool) {
    let mut entries: Vec<(&str, &str, f64, bool)> = Vec::new();
    if train {
        entries.push((
            "train loss",
            TRAIN_COLOUR,
            if smooth { 0.35 } else { 1.0 },
            false,
        ));
    }
    if smooth {
        entries.push(("train loss (EMA)", TRAIN_COLOUR, 1.0, false));
    }
    if eval {
        entries.push(("eval loss", EVAL_COLOUR, 1.0, true));
    }
    if entries.is_empty() {
        return;
    }
    let (w, h) = (140.0, 8.0 + 18.0 * entries.len() as f64);
    let x = WIDTH - RIGHT - w - 8.0;
    let y = TOP + 8.0;
    let _ = writeln!(
        s,
        r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="white" fill-opacity="0.85" stroke="#999"/>"##
    );
    for (i, (label, colour, opacity, dot)) in entries.into_iter().enumerate() {
        let cy = y + 13.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="{colour}" stroke-width="2" stroke-opacity="{opacity}"/>"#,
            x + 8.0,
            x + 32.0
        );
        if dot {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{cy:.1}" r="3" fill="{colour}"/>"#,
                x + 20.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{label}</text>"#,
            x + 40.0,
            cy + 4.0
        );
    }
}

/// `text` with the five XML special characters replaced by entities.
fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that tags are balanced and attribute values quoted; returns the tag names in order.
    fn check_xml(s: &str) -> Vec<String> {
        assert!(s.starts_with("<svg"), "{}", &s[..40.min(s.len())]);
        let mut stack: Vec<String> = Vec::new();
        let mut names = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "'<' inside tag {tag}");
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag}"
            );
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else {
                let name = tag.split_whitespace().next().unwrap().trim_end_matches('/');
                names.push(name.to_string());
                if !tag.ends_with('/') {
                    stack.push(name.to_string());
                }
            }
            // Text between tags must not hold a raw '&' that starts no entity.
            let text_end = rest[close + 1..]
                .find('<')
                .map_or(rest.len(), |i| i + close + 1);
            let text = &rest[close + 1..text_end];
            for (i, _) in text.match_indices('&') {
                let ent = &text[i..];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                        .iter()
                        .any(|e| ent.starts_with(e)),
                    "raw & in {text}"
                );
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(names[0] == "svg");
        names
    }

    fn count(s: &str, pat: &str) -> usize {
        s.matches(pat).count()
    }

    #[test]
    fn short_run_with_eval() {
        let train: Vec<(u64, f32)> = (0..20).map(|i| (i, 3.0 - i as f32 * 0.1)).collect();
        let eval = [(0, 3.1), (10, 2.4), (19, 2.0)];
        let s = loss_curve_svg("SmolLM2 <lora> & \"notes\"", &train, &eval);
        check_xml(&s);
        assert_eq!(count(&s, "<polyline"), 2);
        assert_eq!(count(&s, r#"class="eval""#), 1);
        assert_eq!(count(&s, "<circle"), 3 + 1, "eval dots + legend dot");
        assert!(s.contains("SmolLM2 &lt;lora&gt; &amp; &quot;notes&quot;"));
        assert!(!s.contains("NaN") && !s.contains("inf"));
        assert!(s.contains(">train loss<") && s.contains(">eval loss<"));
    }

    #[test]
    fn long_run_gets_smoothed_line() {
        let train: Vec<(u64, f32)> = (0..200)
            .map(|i| (i * 5, 2.0 + ((i * 37) % 11) as f32 / 10.0))
            .collect();
        let s = loss_curve_svg("t", &train, &[]);
        check_xml(&s);
        assert_eq!(count(&s, "<polyline"), 2);
        assert_eq!(count(&s, r#"class="train-ema""#), 1);
        assert!(!s.contains(r#"class="eval""#));
        assert!(s.contains("(EMA)"));
        // Nice x ticks over 0..995: multiples of 200 up to 1000.
        assert!(
            s.contains(">1000</text>") && s.contains(">200</text>"),
            "{s}"
        );
        assert!(!s.contains(">995</text>"));
    }

    #[test]
    fn degenerate_inputs_have_no_nan() {
        for (train, eval) in [
            (vec![(5u64, 2.5f32)], vec![]),
            (vec![], vec![(3, 1.0)]),
            (vec![], vec![]),
            (vec![(0, f32::NAN), (1, f32::INFINITY)], vec![(1, f32::NAN)]),
            (vec![(0, 0.0), (0, 0.0)], vec![]),
        ] {
            let s = loss_curve_svg("x", &train, &eval);
            check_xml(&s);
            assert!(!s.contains("NaN") && !s.contains("inf"), "{train:?}: {s}");
        }
        let s = loss_curve_svg("x", &[(0, f32::NAN), (1, 2.0), (2, 1.0)], &[]);
        // The NaN point is dropped: two points in the polyline.
        let pts = s
            .split(r#"points=""#)
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(pts.split(' ').count(), 2, "{pts}");
        let s = loss_curve_svg("x", &[], &[]);
        assert_eq!(count(&s, "<polyline"), 0);
        assert!(s.contains("no data"));
    }

    #[test]
    fn ticks_are_nice() {
        let t = Ticks::new(0.13, 2.87, 6, false);
        assert_eq!((t.lo, t.hi, t.step), (0.0, 3.0, 0.5));
        assert_eq!(t.label(1.5), "1.5");
        let t = Ticks::new(0.0, 7.0, 8, true);
        assert_eq!(t.step, 1.0);
        assert_eq!(t.label(3.0), "3");
        let t = Ticks::new(2.0, 2.0, 6, false);
        assert!(t.lo < 2.0 && t.hi > 2.0);
    }

    #[test]
    fn ema_is_debiased() {
        let e = ema(&[(0.0, 4.0), (1.0, 4.0), (2.0, 4.0)]);
        assert!(e.iter().all(|p| (p.1 - 4.0).abs() < 1e-12), "{e:?}");
    }
}
