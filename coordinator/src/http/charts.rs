//! Small server-rendered charts for the status page: a bounded in-memory history of
//! samples (queue length, buildlets in use) and an inline-SVG line chart of it. No
//! JavaScript; the SVG is built from numbers only, so it needs no escaping.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;

use serde::Serialize;

/// How often the sampler records a point.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);
/// Four hours of samples at one per 15 s; older ones are dropped (bounded memory).
pub const MAX_SAMPLES: usize = 4 * 60 * 4;

/// One point of farm history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub at_ms: i64,
    /// Work items waiting in the scheduler, all host types and classes.
    pub queued: usize,
    /// Buildlets leased out, all pools.
    pub in_use: usize,
}

/// The history: a ring buffer of at most `capacity` samples, oldest first.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    samples: Mutex<VecDeque<Sample>>,
}

impl Default for History {
    fn default() -> Self {
        History::new(MAX_SAMPLES)
    }
}

impl History {
    pub fn new(capacity: usize) -> Self {
        History {
            capacity: capacity.max(1),
            samples: Mutex::new(VecDeque::with_capacity(capacity.max(1))),
        }
    }

    /// Records a sample; when full the oldest is dropped.
    pub fn push(&self, s: Sample) {
        let mut v = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() == self.capacity {
            v.pop_front();
        }
        v.push_back(s);
    }

    pub fn snapshot(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

const W: f64 = 560.0;
const H: f64 = 110.0;
const PAD_L: f64 = 34.0;
const PAD_B: f64 = 16.0;
const PAD_T: f64 = 8.0;

/// An inline SVG line chart of `points` (time ms, value) over the `window_ms` before
/// `now_ms`, with a y axis from 0 to the largest value (at least 1).
pub fn line_chart(title: &str, points: &[(i64, f64)], now_ms: i64, window_ms: i64) -> String {
    let window_ms = window_ms.max(1);
    let start = now_ms - window_ms;
    let max = points
        .iter()
        .filter(|(t, _)| *t >= start)
        .map(|(_, v)| *v)
        .fold(1.0_f64, f64::max)
        .ceil();
    let plot_w = W - PAD_L - 4.0;
    let plot_h = H - PAD_T - PAD_B;
    let x = |t: i64| PAD_L + plot_w * ((t - start) as f64 / window_ms as f64).clamp(0.0, 1.0);
    let y = |v: f64| PAD_T + plot_h * (1.0 - (v / max).clamp(0.0, 1.0));
    let mut svg = String::new();
    // `title` is ours (a constant), but escape it anyway so the function is safe to reuse.
    let title = title
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let _ = write!(
        svg,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{title}\"><title>{title}</title>"
    );
    let (x0, x1, yb, yt) = (PAD_L, W - 4.0, y(0.0), y(max));
    let _ = write!(
        svg,
        "<line x1=\"{x0}\" y1=\"{yb}\" x2=\"{x1}\" y2=\"{yb}\" stroke=\"#999\"/>\
         <line x1=\"{x0}\" y1=\"{yt}\" x2=\"{x1}\" y2=\"{yt}\" stroke=\"#eee\"/>\
         <text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{max}</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">0</text>\
         <text x=\"{x0}\" y=\"{H}\" font-size=\"10\">-{}</text>\
         <text x=\"{x1}\" y=\"{H}\" font-size=\"10\" text-anchor=\"end\">now</text>",
        PAD_L - 3.0,
        yt + 4.0,
        PAD_L - 3.0,
        yb,
        super::fmt_duration_secs((window_ms / 1000).max(0) as u64)
    );
    let visible: Vec<&(i64, f64)> = points
        .iter()
        .filter(|(t, _)| *t >= start && *t <= now_ms)
        .collect();
    if visible.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#888\" text-anchor=\"middle\">no samples yet</text>",
            PAD_L + plot_w / 2.0,
            PAD_T + plot_h / 2.0
        );
    } else {
        svg.push_str("<polyline fill=\"none\" stroke=\"#2a6fdb\" stroke-width=\"1.5\" points=\"");
        for (i, (t, v)) in visible.iter().enumerate() {
            if i > 0 {
                svg.push(' ');
            }
            let _ = write!(svg, "{:.1},{:.1}", x(*t), y(*v));
        }
        svg.push_str("\"/>");
        // The newest point as a dot, so a single sample is visible too.
        if let Some((t, v)) = visible.last() {
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"#2a6fdb\"/>",
                x(*t),
                y(*v)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_keeps_the_newest() {
        let h = History::new(3);
        for i in 0..5 {
            h.push(Sample {
                at_ms: i,
                queued: i as usize,
                in_use: 0,
            });
        }
        let s = h.snapshot();
        assert_eq!(s.iter().map(|s| s.at_ms).collect::<Vec<_>>(), [2, 3, 4]);
    }

    #[test]
    fn chart_plots_points_in_the_window_only() {
        let now = 1_000_000;
        let pts = [(now - 2_000_000, 50.0), (now - 500_000, 2.0), (now, 4.0)];
        let svg = line_chart("queue <len>", &pts, now, 1_000_000);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains("queue &lt;len&gt;"), "title escaped: {svg}");
        // Max of the visible points is 4, not the old 50.
        assert!(svg.contains(">4</text>"), "{svg}");
        let poly = svg.split("points=\"").nth(1).expect("polyline");
        let n = poly.split('"').next().expect("points").split(' ').count();
        assert_eq!(n, 2, "{svg}");
    }

    #[test]
    fn empty_chart_says_so() {
        let svg = line_chart("q", &[], 10, 10);
        assert!(svg.contains("no samples yet"));
        assert!(!svg.contains("polyline"));
    }
}
