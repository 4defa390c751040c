//! What the server is doing, for its operator: live status, Prometheus metrics and a
//! dashboard page, served over HTTP when `http_listen` is set (`--http`).
//!
//! - `/metrics`: Prometheus text exposition (OpenMetrics 1.0, from `prometheus-client`):
//!   rounds, a histogram of round seconds, connected and selected nodes, message bytes in
//!   and out, update rejections and connection refusals by kind, epsilon spent and its
//!   target, the age of the last checkpoint.
//! - `/status`: JSON: round, phase, whom the round waits for, its deadline, the ETA of the
//!   run, connected nodes (address, software version, connected and last-seen times, state,
//!   certificate expiry), per-round history, warnings.
//! - `/`: a dashboard page without scripts that reloads itself every 2 s: accuracy and loss
//!   per round and epsilon against its target as inline SVG, nodes and their state.
//!
//! **Everything here is operator-only data** (participants, failures, timings): with DP on
//! it is outside the guarantee, like `operator/`. The endpoint is off by default; bind it
//! to loopback (the `--http` default) and reach it through an SSH tunnel or a proxy that
//! authenticates.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

type Labels = Vec<(String, String)>;

/// The server's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    /// Rounds completed by this process.
    pub rounds: Counter,
    /// The round the server is on.
    pub round: Gauge,
    /// Seconds from a round's first request to its aggregate.
    pub round_seconds: Histogram,
    /// Nodes connected.
    pub connected: Gauge,
    /// Nodes selected in the open round.
    pub selected: Gauge,
    /// Bytes of messages received from nodes.
    pub bytes_in: Counter,
    /// Bytes of messages sent to nodes.
    pub bytes_out: Counter,
    /// Rejected messages by kind (update validation, transport errors).
    pub rejections: Family<Labels, Counter>,
    /// Connection attempts turned away by reason.
    pub refusals: Family<Labels, Counter>,
    /// Epsilon spent (ledger).
    pub epsilon: Gauge<f64, AtomicU64>,
    /// Target epsilon (absent: none).
    pub epsilon_target: Gauge<f64, AtomicU64>,
    /// Seconds since the last checkpoint was written.
    pub checkpoint_age: Gauge<f64, AtomicU64>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("dpfl");
        let m = Self {
            rounds: Counter::default(),
            round: Gauge::default(),
            round_seconds: Histogram::new([
                0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
            connected: Gauge::default(),
            selected: Gauge::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            rejections: Family::default(),
            refusals: Family::default(),
            epsilon: Gauge::default(),
            epsilon_target: Gauge::default(),
            checkpoint_age: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rounds_completed",
            "Rounds completed by this server process",
            m.rounds.clone(),
        );
        registry.register("round", "The round the server is on", m.round.clone());
        registry.register_with_unit(
            "round_duration",
            "Seconds from a round's first request to its aggregate",
            Unit::Seconds,
            m.round_seconds.clone(),
        );
        registry.register("connected_nodes", "Nodes connected", m.connected.clone());
        registry.register(
            "selected_nodes",
            "Nodes selected in the open round",
            m.selected.clone(),
        );
        registry.register_with_unit(
            "received",
            "Bytes of messages received from nodes",
            Unit::Bytes,
            m.bytes_in.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Bytes of messages sent to nodes",
            Unit::Bytes,
            m.bytes_out.clone(),
        );
        registry.register(
            "rejections",
            "Messages from nodes rejected, by kind",
            m.rejections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connection attempts turned away before a node joined, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "epsilon_spent",
            "Epsilon spent so far (privacy ledger; 0 without DP)",
            m.epsilon.clone(),
        );
        registry.register(
            "epsilon_target",
            "Target epsilon (0: none)",
            m.epsilon_target.clone(),
        );
        registry.register_with_unit(
            "checkpoint_age",
            "Seconds since the last checkpoint was written (0 before the first)",
            Unit::Seconds,
            m.checkpoint_age.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one rejected message of `kind`.
    pub fn reject(&self, kind: &str) {
        self.rejections
            .get_or_create(&vec![("kind".into(), kind.into())])
            .inc();
    }

    /// Counts one connection attempt turned away for `reason`.
    pub fn refuse(&self, reason: &str) {
        self.refusals
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }
}

/// A connected node as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Remote address.
    pub remote: String,
    /// Software it announced (peer text, escaped when shown).
    pub version: String,
    /// When it joined (Unix seconds).
    pub connected_since: f64,
    /// Last time it was heard from (join, answer), Unix seconds.
    pub last_seen: f64,
    /// `idle`, `training` or `evaluating`.
    pub state: String,
    /// Rounds whose request it answered in this process.
    pub answers: u64,
    /// When its certificate expires (Unix seconds).
    pub cert_expires: Option<i64>,
}

/// One finished round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundPoint {
    /// Round.
    pub round: u64,
    /// Centralised test accuracy.
    pub test_accuracy: Option<f64>,
    /// Centralised test loss.
    pub test_loss: Option<f64>,
    /// Epsilon after the round.
    pub epsilon: Option<f64>,
    /// Seconds.
    pub seconds: f64,
    /// Accepted updates.
    pub participants: usize,
    /// When it completed (Unix seconds).
    pub unix_time: f64,
}

/// The live status (`/status`).
#[derive(Debug, Clone, Serialize)]
pub struct StatusState {
    /// Software.
    pub server: String,
    /// When this process started (Unix seconds).
    pub started: f64,
    /// Rounds configured.
    pub rounds: u64,
    /// Rounds completed (including those of earlier processes of this run).
    pub completed_rounds: u64,
    /// The open round, or the next.
    pub round: u64,
    /// Attempt of the open round.
    pub attempt: u32,
    /// `waiting_for_clients`, `starting`, `training`, `evaluating`, `finished`, `complete`.
    pub phase: String,
    /// Nodes selected in the open round.
    pub selected: usize,
    /// Nodes the open phase still waits for.
    pub waiting_for: Vec<String>,
    /// Deadline of the open phase (Unix seconds).
    pub deadline: Option<f64>,
    /// Estimated seconds until the last round completes.
    pub eta_secs: Option<f64>,
    /// Clients required before a round starts.
    pub min_clients: usize,
    /// DP mode.
    pub dp_mode: String,
    /// Epsilon spent.
    pub epsilon: Option<f64>,
    /// Target epsilon.
    pub target_epsilon: Option<f64>,
    /// delta.
    pub delta: Option<f64>,
    /// Seconds since the last checkpoint.
    pub checkpoint_age_secs: Option<f64>,
    /// Connected nodes.
    pub nodes: BTreeMap<String, NodeStatus>,
    /// Finished rounds of this process.
    pub history: Vec<RoundPoint>,
    /// Configuration and credential warnings (CA key next to the server's, expiring
    /// certificates).
    pub warnings: Vec<String>,
    /// The latest connection refusals worth a line (identified peers, expired
    /// certificates, duplicate identities), newest last.
    pub refusals: VecDeque<String>,
    /// Why training ended.
    pub finish: Option<String>,
    #[serde(skip)]
    last_checkpoint: Option<Instant>,
}

/// Status and metrics shared by the driver, the connection tasks and the HTTP endpoint.
pub struct Observatory {
    status: Mutex<StatusState>,
    /// Prometheus metrics.
    pub metrics: Metrics,
}

/// Now as Unix seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An `Instant` in the future as Unix seconds.
pub fn unix_at(t: Instant) -> f64 {
    unix_now() + t.saturating_duration_since(Instant::now()).as_secs_f64()
}

impl Observatory {
    /// A new observatory for a run of `rounds` rounds.
    pub fn new(rounds: u64, min_clients: usize, dp_mode: String) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(StatusState {
                server: format!("dpfl-server/{}", env!("CARGO_PKG_VERSION")),
                started: unix_now(),
                rounds,
                completed_rounds: 0,
                round: 1,
                attempt: 0,
                phase: "waiting_for_clients".into(),
                selected: 0,
                waiting_for: Vec::new(),
                deadline: None,
                eta_secs: None,
                min_clients,
                dp_mode,
                epsilon: None,
                target_epsilon: None,
                delta: None,
                checkpoint_age_secs: None,
                nodes: BTreeMap::new(),
                history: Vec::new(),
                warnings: Vec::new(),
                refusals: VecDeque::new(),
                finish: None,
                last_checkpoint: None,
            }),
            metrics: Metrics::new(),
        })
    }

    /// The status, to read or change.
    pub fn status(&self) -> MutexGuard<'_, StatusState> {
        // The state stays consistent even if a holder panicked mid-update.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a refusal worth showing (kept: the last 20).
    pub fn note_refusal(&self, line: String) {
        let mut s = self.status();
        s.refusals.push_back(line);
        while s.refusals.len() > 20 {
            s.refusals.pop_front();
        }
    }

    /// Records that a checkpoint was written now.
    pub fn checkpointed(&self) {
        self.status().last_checkpoint = Some(Instant::now());
    }

    /// The status with its time-dependent fields brought up to date.
    pub fn snapshot(&self) -> StatusState {
        let mut s = self.status().clone();
        s.checkpoint_age_secs = s.last_checkpoint.map(|t| t.elapsed().as_secs_f64());
        s
    }

    /// The Prometheus text exposition.
    pub fn metrics_text(&self) -> String {
        let age = self
            .status()
            .last_checkpoint
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.metrics.checkpoint_age.set(age);
        let mut out = String::new();
        if encode(&mut out, &self.metrics.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Estimated seconds until the last round completes: the mean round time so far times the
/// rounds left, less what the open round has already taken.
pub fn eta(history: &[RoundPoint], rounds_left: u64, open_for: Option<f64>) -> Option<f64> {
    if history.is_empty() {
        return None;
    }
    let mean = history.iter().map(|r| r.seconds).sum::<f64>() / history.len() as f64;
    Some((mean * rounds_left as f64 - open_for.unwrap_or(0.0)).max(0.0))
}

/// "2 min", "45 s", "1.5 h".
pub fn human_secs(s: f64) -> String {
    if s >= 5400.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 120.0 {
        format!("{:.0} min", s / 60.0)
    } else if s >= 10.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// One line of a chart.
struct Series<'a> {
    label: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

/// A small line chart as inline SVG: rounds on x, values on y, an optional dashed
/// horizontal line (a target).
fn chart(
    title: &str,
    series: &[Series<'_>],
    hline: Option<(&str, f64)>,
    rounds: u64,
    range: Option<(f64, f64)>,
) -> String {
    let (w, h, l, r, t, b) = (370.0, 230.0, 50.0, 14.0, 30.0, 34.0);
    let mut ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .collect();
    if let Some((_, y)) = hline {
        ys.push(y);
    }
    let (mut lo, mut hi) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    lo = lo.min(0.0);
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    hi += (hi - lo) * 0.05;
    if let Some(fixed) = range {
        (lo, hi) = fixed;
    }
    let x_max = rounds.max(1) as f64;
    let px = |x: f64| l + (x - 0.0) / x_max * (w - l - r);
    let py = |y: f64| t + (1.0 - (y - lo) / (hi - lo)) * (h - t - b);
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{t}\">\
         <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#fff\"/>\
         <text x=\"{l}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{t}</text>",
        t = escape(title)
    );
    // Axes and ticks.
    let _ = write!(
        svg,
        "<line x1=\"{l}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"#444\"/>\
         <line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{y0}\" stroke=\"#444\"/>",
        y0 = h - b,
        x1 = w - r
    );
    for i in 0..=4 {
        let v = lo + (hi - lo) * i as f64 / 4.0;
        let y = py(v);
        let _ = write!(
            svg,
            "<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{x1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{tx}\" y=\"{ty:.1}\" font-size=\"11\" text-anchor=\"end\">{v}</text>",
            x1 = w - r,
            tx = l - 6.0,
            ty = y + 4.0,
            v = tick(v)
        );
    }
    let step = (x_max / 10.0).ceil().max(1.0) as u64;
    let mut x = 0;
    while x <= rounds.max(1) {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{x}</text>",
            px(x as f64),
            h - b + 16.0
        );
        x += step;
    }
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">round</text>",
        (l + w - r) / 2.0,
        h - 4.0
    );
    if let Some((label, y)) = hline {
        let _ = write!(
            svg,
            "<line x1=\"{l}\" y1=\"{yy:.1}\" x2=\"{x1}\" y2=\"{yy:.1}\" stroke=\"#c00\" \
             stroke-dasharray=\"6 4\"/><text x=\"{x1}\" y=\"{ty:.1}\" font-size=\"11\" \
             fill=\"#c00\" text-anchor=\"end\">{label}</text>",
            yy = py(y),
            x1 = w - r,
            ty = py(y) - 4.0,
            label = escape(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        if !pts.is_empty() {
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{p}\"/>",
                c = s.color,
                p = pts.join(" ")
            );
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = write!(
                    svg,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{c}\"/>",
                    c = s.color
                );
            }
        }
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"18\" font-size=\"12\" fill=\"{c}\" text-anchor=\"end\">{lab}</text>",
            w - r - 90.0 * i as f64,
            c = s.color,
            lab = escape(s.label)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ago(now: f64, t: f64) -> String {
    format!("{} ago", human_secs((now - t).max(0.0)))
}

/// The dashboard page: no scripts; it reloads itself every 2 seconds.
pub fn dashboard(s: &StatusState) -> String {
    let now = unix_now();
    let mut h = String::new();
    let title = match s.phase.as_str() {
        "finished" | "complete" => {
            format!("Finished: {} of {} rounds", s.completed_rounds, s.rounds)
        }
        _ => format!("Round {} of {}", s.round, s.rounds),
    };
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <title>dpfl server: {title}</title><style>\
         body{{font-family:sans-serif;margin:20px;color:#222;background:#f6f6f6}}\
         h1{{font-size:22px;margin:0 0 4px}} .sub{{color:#555;margin:0 0 14px}}\
         .cards{{display:flex;flex-wrap:wrap;gap:12px}} .card{{background:#fff;\
         border:1px solid #ddd;border-radius:6px;padding:8px}}\
         table{{border-collapse:collapse;background:#fff;margin-top:12px}}\
         td,th{{border:1px solid #ddd;padding:4px 8px;font-size:13px;text-align:left}}\
         .training{{color:#06c;font-weight:bold}} .evaluating{{color:#909}}\
         .warn{{background:#fff3cd;border:1px solid #e0c060;padding:6px;margin:6px 0}}\
         .note{{color:#777;font-size:12px}}</style></head><body>\
         <h1 id=\"title\">dpfl server: {title}</h1>",
        title = escape(&title)
    );
    let mut line = vec![format!("phase: {}", s.phase.replace('_', " "))];
    if s.attempt > 1 {
        line.push(format!("attempt {}", s.attempt));
    }
    if s.phase == "training" || s.phase == "evaluating" {
        line.push(format!("{} selected", s.selected));
        if !s.waiting_for.is_empty() {
            let mut w: Vec<&str> = s.waiting_for.iter().map(String::as_str).take(12).collect();
            if s.waiting_for.len() > 12 {
                w.push("...");
            }
            line.push(format!(
                "waiting for {} ({})",
                s.waiting_for.len(),
                w.join(", ")
            ));
        }
        if let Some(d) = s.deadline {
            line.push(format!("deadline in {}", human_secs((d - now).max(0.0))));
        }
    }
    if s.phase == "waiting_for_clients" {
        line.push(format!(
            "{} of {} clients connected",
            s.nodes.len(),
            s.min_clients
        ));
    }
    if let Some(e) = s.eta_secs {
        line.push(format!("ETA {}", human_secs(e)));
    }
    let _ = write!(
        h,
        "<p class=\"sub\" id=\"phase\">{}</p>",
        escape(&line.join(" · "))
    );
    let privacy = match (s.epsilon, s.target_epsilon) {
        (Some(e), Some(t)) => format!(
            "DP {}: epsilon {e:.3} of target {t} (delta {})",
            s.dp_mode,
            s.delta.unwrap_or(0.0)
        ),
        (Some(e), None) => format!(
            "DP {}: epsilon {e:.3} (delta {}), no target",
            s.dp_mode,
            s.delta.unwrap_or(0.0)
        ),
        _ => format!("DP {}: no privacy guarantee", s.dp_mode),
    };
    let _ = write!(h, "<p class=\"sub\">{}", escape(&privacy));
    if let Some(a) = s.checkpoint_age_secs {
        let _ = write!(h, " · last checkpoint {}", escape(&human_secs(a)));
        h.push_str(" ago");
    }
    h.push_str("</p>");
    if let Some(f) = &s.finish {
        let _ = write!(h, "<p class=\"sub\">{}</p>", escape(f));
    }
    for w in &s.warnings {
        let _ = write!(h, "<div class=\"warn\">{}</div>", escape(w));
    }
    let x = |f: fn(&RoundPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        s.history
            .iter()
            .filter_map(|r| f(r).map(|v| (r.round as f64, v)))
            .collect()
    };
    h.push_str("<div class=\"cards\"><div class=\"card\">");
    h.push_str(&chart(
        "Test accuracy",
        &[Series {
            label: "accuracy",
            color: "#1f77b4",
            points: x(|r| r.test_accuracy),
        }],
        None,
        s.rounds,
        Some((0.0, 1.0)),
    ));
    h.push_str("</div><div class=\"card\">");
    h.push_str(&chart(
        "Test loss",
        &[Series {
            label: "loss",
            color: "#ff7f0e",
            points: x(|r| r.test_loss),
        }],
        None,
        s.rounds,
        None,
    ));
    h.push_str("</div><div class=\"card\">");
    let target = s.target_epsilon.map(|t| (format!("target {t}"), t));
    h.push_str(&chart(
        "Epsilon spent",
        &[Series {
            label: "epsilon",
            color: "#2ca02c",
            points: x(|r| r.epsilon),
        }],
        target.as_ref().map(|(l, t)| (l.as_str(), *t)),
        s.rounds,
        None,
    ));
    h.push_str("</div></div>");
    let _ = write!(
        h,
        "<table id=\"nodes\"><tr><th>node ({} connected)</th><th>state</th><th>address</th>\
         <th>version</th><th>connected</th><th>last seen</th><th>answers</th>\
         <th>certificate</th></tr>",
        s.nodes.len()
    );
    for (name, n) in &s.nodes {
        let cert = n.cert_expires.map_or("-".into(), |t| {
            format!("expires {}", dpfl_certs::format_unix(t))
        });
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"{st}\">{st}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            escape(&n.remote),
            escape(&n.version),
            escape(&ago(now, n.connected_since)),
            escape(&ago(now, n.last_seen)),
            n.answers,
            escape(&cert),
            st = escape(&n.state)
        );
    }
    h.push_str("</table>");
    if !s.history.is_empty() {
        h.push_str(
            "<table id=\"rounds\"><tr><th>round</th><th>test accuracy</th><th>test loss</th>\
             <th>epsilon</th><th>participants</th><th>seconds</th></tr>",
        );
        for r in s.history.iter().rev().take(10) {
            let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
                r.round,
                f(r.test_accuracy),
                f(r.test_loss),
                f(r.epsilon),
                r.participants,
                r.seconds
            );
        }
        h.push_str("</table>");
    }
    if !s.refusals.is_empty() {
        h.push_str("<h2 style=\"font-size:15px\">Recent refusals</h2><ul>");
        for r in s.refusals.iter().rev().take(5) {
            let _ = write!(h, "<li>{}</li>", escape(r));
        }
        h.push_str("</ul>");
    }
    let _ = write!(
        h,
        "<p class=\"note\">Operator-only data (participants, timings, failures): not covered \
         by the privacy guarantee. JSON at <a href=\"/status\">/status</a>, Prometheus metrics \
         at <a href=\"/metrics\">/metrics</a>. {}, started {}.</p></body></html>",
        escape(&s.server),
        escape(&ago(now, s.started))
    );
    h
}

/// The HTTP routes.
pub fn router(obs: Arc<Observatory>) -> axum::Router {
    use axum::http::header::CONTENT_TYPE;
    use axum::response::{Html, IntoResponse};
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/",
            get(
                |axum::extract::State(o): axum::extract::State<Arc<Observatory>>| async move {
                    Html(dashboard(&o.snapshot()))
                },
            ),
        )
        .route(
            "/status",
            get(
                |axum::extract::State(o): axum::extract::State<Arc<Observatory>>| async move {
                    axum::Json(o.snapshot())
                },
            ),
        )
        .route(
            "/metrics",
            get(
                |axum::extract::State(o): axum::extract::State<Arc<Observatory>>| async move {
                    (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        o.metrics_text(),
                    )
                        .into_response()
                },
            ),
        )
        .with_state(obs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_escapes_peer_text_and_shows_the_round() {
        let obs = Observatory::new(5, 2, "central".into());
        {
            let mut s = obs.status();
            s.round = 3;
            s.phase = "training".into();
            s.selected = 2;
            s.waiting_for = vec!["node-2".into()];
            s.epsilon = Some(1.5);
            s.target_epsilon = Some(4.0);
            s.nodes.insert(
                "node-2".into(),
                NodeStatus {
                    remote: "127.0.0.1:5000".into(),
                    version: "<script>alert(1)</script>".into(),
                    connected_since: unix_now(),
                    last_seen: unix_now(),
                    state: "training".into(),
                    answers: 2,
                    cert_expires: Some(2_000_000_000),
                },
            );
            for r in 1..=2 {
                s.history.push(RoundPoint {
                    round: r,
                    test_accuracy: Some(0.5 + r as f64 / 10.0),
                    test_loss: Some(1.0 / r as f64),
                    epsilon: Some(r as f64 * 0.75),
                    seconds: 1.0,
                    participants: 2,
                    unix_time: unix_now(),
                });
            }
        }
        let page = dashboard(&obs.snapshot());
        assert!(page.contains("Round 3 of 5"), "{page}");
        assert!(page.contains("waiting for 1 (node-2)"), "{page}");
        assert!(page.contains("target 4"), "{page}");
        assert!(!page.contains("<script>"), "peer text must be escaped");
        assert!(page.contains("&lt;script&gt;"));
        assert!(
            !page.to_lowercase().contains("<script"),
            "the page has no scripts"
        );
        assert_eq!(page.matches("<svg").count(), 3);
    }

    #[test]
    fn metrics_text_has_the_families() {
        let obs = Observatory::new(5, 2, "none".into());
        obs.metrics.rounds.inc();
        obs.metrics.round_seconds.observe(0.3);
        obs.metrics.reject("nan");
        obs.metrics.refuse("cert_expired");
        let t = obs.metrics_text();
        for name in [
            "dpfl_rounds_completed_total 1",
            "dpfl_round_duration_seconds_count 1",
            "dpfl_rejections_total{kind=\"nan\"} 1",
            "dpfl_connections_refused_total{reason=\"cert_expired\"} 1",
            "dpfl_checkpoint_age_seconds",
            "dpfl_received_bytes_total",
        ] {
            assert!(t.contains(name), "{name} missing in\n{t}");
        }
    }

    #[test]
    fn eta_is_mean_round_time_times_rounds_left() {
        let p = |s| RoundPoint {
            round: 1,
            test_accuracy: None,
            test_loss: None,
            epsilon: None,
            seconds: s,
            participants: 1,
            unix_time: 0.0,
        };
        assert_eq!(eta(&[], 3, None), None);
        assert_eq!(eta(&[p(2.0), p(4.0)], 3, Some(1.0)), Some(8.0));
        assert_eq!(human_secs(150.0), "2 min");
    }
}
