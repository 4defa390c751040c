//! The statistics exchange before round 1 (federated standardisation over QUIC).
//!
//! A state machine like the coordinator: events in (`handle_*`), messages out
//! ([`StatsExchange::poll_message`]), no socket, no clock, no file. The service holds a
//! joining node here instead of handing it to the coordinator:
//!
//! 1. Before agreement every joining node is asked for its statistics
//!    ([`Header::StatsRequest`]); each answer is validated ([`validate_report`]) and summed.
//! 2. Once `min_contributors` nodes have answered, [`StatsExchange::agree`] (with DP on,
//!    after the server's noise in `central` mode) turns the sum into a [`Standardizer`].
//!    The service makes it durable (and, with DP on, the ledger row) **before**
//!    [`StatsExchange::publish`] sends it: every waiting node gets [`Header::Standardize`].
//! 3. A node that answers [`Header::Standardized`] is handed to the coordinator. Nodes that
//!    join later (or reconnect) get the agreed transform at once; their statistics are
//!    not asked for (the transform is fixed once it left the server).
//!
//! Sensitivity (DP on): the neighbouring relation of the ledger, add or remove one client
//! with all of its data. Each node sends its statistics clipped to the public bounds,
//! mapped to `[0, 1]` and divided by its row count, so one node's contribution has L2
//! norm at most `sqrt(3d + 1)` whatever its size (and the combined transform weighs every
//! node equally, like DP-FedAvg's updates). `central`: the server adds
//! `N(0, (z sqrt(3d+1))^2)` to the sum once (sensitivity `sqrt(3d+1)`, multiplier z,
//! q = 1); `local`: each node adds the same noise to its own contribution (against the
//! server the sensitivity is twice that, multiplier z/2, as for local-mode updates).

use crate::coordinator::NodeInfo;
use crate::strategy::NodeId;
use dpfl_common::dp::GaussianNoise;
use dpfl_common::model::SpecHash;
use dpfl_common::wire::{Header, StatsReport, StatsRequest};
use dpfl_ml::standardize::{Bounds, FeatureStats, StandardizeError, Standardizer};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Why a node's statistics were refused. A refused node is not counted and not asked
/// again; it still receives the agreed transform.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatsRejection {
    /// The report names another model.
    #[error("statistics for another model (spec hash differs)")]
    SpecHash,
    /// Not asked for (not joined, already counted, or the transform is already agreed).
    #[error("statistics not asked for: {0}")]
    Unexpected(String),
    /// Lengths that do not match the model.
    #[error("{what}: {got} values, expected {expected}")]
    Shape {
        /// Which vector.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// The form (bounded, normalised, noised) differs from the request's.
    #[error("statistics in another form than asked: {0}")]
    Form(String),
    /// A value that is not finite or out of its possible range.
    #[error("implausible statistics: {0}")]
    Implausible(String),
}

/// What the exchange needs to know.
#[derive(Debug, Clone)]
pub struct ExchangeSettings {
    /// The model's spec hash.
    pub spec_hash: SpecHash,
    /// Features (the model's inputs).
    pub dim: usize,
    /// Classes (the model's outputs).
    pub classes: usize,
    /// Public ranges (required with DP on).
    pub bounds: Option<Bounds>,
    /// With DP on: the statistics' noise multiplier z (`None`: exact statistics).
    pub noise_multiplier: Option<f64>,
    /// `local` mode: nodes add the noise themselves; otherwise the server adds it.
    pub local: bool,
    /// Answers needed before the transform is agreed.
    pub min_contributors: usize,
}

impl ExchangeSettings {
    /// The request every node is sent.
    pub fn request(&self) -> StatsRequest {
        let (lo, hi) = self
            .bounds
            .as_ref()
            .map_or((Vec::new(), Vec::new()), |b| (b.lo.clone(), b.hi.clone()));
        StatsRequest {
            spec_hash: self.spec_hash,
            lo,
            hi,
            local_noise_multiplier: self.noise_multiplier.filter(|_| self.local),
            central_noise_multiplier: self.noise_multiplier.filter(|_| !self.local),
            normalized: self.noise_multiplier.is_some(),
        }
    }
}

/// Checks a node's report against the request and what the node declared at join
/// (`num_examples`), and returns its statistics. Exact statistics must be possible for
/// `num_examples` rows: counts and label counts in `[0, rows]` (label counts summing to
/// at most `rows`), sums of squares non-negative and, for bounded unit values, sums in
/// `[0, count]` and sums of squares in `[0, sum]`; normalised ones the same with rows =
/// 1. Noised statistics can be anything finite; the noise is what bounds them.
pub fn validate_report(
    r: &StatsReport,
    s: &ExchangeSettings,
    num_examples: u64,
) -> Result<FeatureStats, StatsRejection> {
    if r.spec_hash != s.spec_hash {
        return Err(StatsRejection::SpecHash);
    }
    for (what, v, expected) in [
        ("count", &r.count, s.dim),
        ("sum", &r.sum, s.dim),
        ("sum_sq", &r.sum_sq, s.dim),
        ("label_counts", &r.label_counts, s.classes),
    ] {
        if v.len() != expected {
            return Err(StatsRejection::Shape {
                what,
                expected,
                got: v.len(),
            });
        }
    }
    let want = s.request();
    let bounded = s.bounds.is_some();
    if r.bounded != bounded
        || r.normalized != want.normalized
        || r.noised != want.local_noise_multiplier.is_some()
    {
        return Err(StatsRejection::Form(format!(
            "asked bounded={bounded} normalized={} noised={}, got bounded={} normalized={} \
             noised={}",
            want.normalized,
            want.local_noise_multiplier.is_some(),
            r.bounded,
            r.normalized,
            r.noised
        )));
    }
    let all = || {
        r.count
            .iter()
            .chain(&r.sum)
            .chain(&r.sum_sq)
            .chain(&r.label_counts)
    };
    if all().any(|v| !v.is_finite()) {
        return Err(StatsRejection::Implausible("a value is not finite".into()));
    }
    if !r.noised {
        let rows = if r.normalized {
            1.0
        } else {
            num_examples as f64
        };
        // Normalised values are quotients: allow their rounding.
        let slack = |x: f64| x * (1.0 + 1e-9) + 1e-9;
        let in_rows = |v: f64| (0.0..=slack(rows)).contains(&v);
        if let Some((j, c)) = r.count.iter().enumerate().find(|(_, c)| !in_rows(**c)) {
            return Err(StatsRejection::Implausible(format!(
                "feature {j}: count {c} outside [0, {rows}] (the node declared {num_examples} \
                 examples)"
            )));
        }
        if r.label_counts.iter().any(|c| !in_rows(*c))
            || r.label_counts.iter().sum::<f64>() > slack(rows)
        {
            return Err(StatsRejection::Implausible(format!(
                "label counts {:?} do not fit {rows} rows",
                r.label_counts
            )));
        }
        for j in 0..s.dim {
            let (c, sum, sq) = (r.count[j], r.sum[j], r.sum_sq[j]);
            let ok = if bounded {
                (0.0..=slack(c)).contains(&sum) && (0.0..=slack(sum)).contains(&sq)
            } else {
                // Cauchy-Schwarz: sum^2 <= count * sum of squares.
                sq >= 0.0 && sum * sum <= slack(c * sq) + 1e-6 * sum.abs().max(1.0)
            };
            if !ok {
                return Err(StatsRejection::Implausible(format!(
                    "feature {j}: count {c}, sum {sum}, sum of squares {sq} are not the \
                     statistics of any data{}",
                    if bounded { " in [0, 1]" } else { "" }
                )));
            }
        }
    }
    FeatureStats::from_report(r).map_err(|e| StatsRejection::Implausible(e.to_string()))
}

/// The exchange's state (see the module docs).
#[derive(Debug)]
pub struct StatsExchange {
    settings: ExchangeSettings,
    /// Joined, waiting for the agreed transform (asked for statistics unless counted).
    waiting: BTreeMap<NodeId, NodeInfo>,
    /// Sent the transform, waiting for its acknowledgement.
    applying: BTreeMap<NodeId, NodeInfo>,
    /// Whose statistics are in `total`.
    contributors: BTreeSet<NodeId>,
    /// Asked and not refused or answered (not asked again on a reconnect while pending).
    asked: BTreeSet<NodeId>,
    total: FeatureStats,
    agreed: Option<Standardizer>,
    outbox: VecDeque<(NodeId, Header)>,
}

impl StatsExchange {
    /// A fresh exchange.
    pub fn new(settings: ExchangeSettings) -> Self {
        let total = FeatureStats::zeros(settings.dim, settings.classes, settings.bounds.is_some());
        Self {
            settings,
            waiting: BTreeMap::new(),
            applying: BTreeMap::new(),
            contributors: BTreeSet::new(),
            asked: BTreeSet::new(),
            total,
            agreed: None,
            outbox: VecDeque::new(),
        }
    }

    /// An exchange whose transform was agreed before (a resumed run): nodes get it at once.
    pub fn resumed(settings: ExchangeSettings, agreed: Standardizer) -> Self {
        let mut s = Self::new(settings);
        s.agreed = Some(agreed);
        s
    }

    /// The agreed transform, once there is one.
    pub fn agreed(&self) -> Option<&Standardizer> {
        self.agreed.as_ref()
    }

    /// The settings.
    pub fn settings(&self) -> &ExchangeSettings {
        &self.settings
    }

    /// Nodes whose statistics are counted.
    pub fn contributors(&self) -> &BTreeSet<NodeId> {
        &self.contributors
    }

    /// Nodes joined and not yet handed to the coordinator.
    pub fn pending(&self) -> impl Iterator<Item = &NodeId> {
        self.waiting.keys().chain(self.applying.keys())
    }

    /// The next message to send: (node, header; all without payload, round
    /// [`dpfl_common::wire::STATS_ROUND`]).
    pub fn poll_message(&mut self) -> Option<(NodeId, Header)> {
        self.outbox.pop_front()
    }

    fn send_transform(&mut self, node: NodeId, info: NodeInfo) {
        if let Some(a) = &self.agreed {
            let spec = a.to_spec(self.settings.spec_hash);
            self.outbox
                .push_back((node.clone(), Header::Standardize(spec)));
            self.applying.insert(node, info);
        }
    }

    /// A node joined (or reconnected).
    pub fn handle_join(&mut self, node: NodeId, info: NodeInfo) {
        self.applying.remove(&node);
        if self.agreed.is_some() {
            self.waiting.remove(&node);
            self.send_transform(node, info);
            return;
        }
        if !self.contributors.contains(&node) {
            self.asked.insert(node.clone());
            self.outbox
                .push_back((node.clone(), Header::StatsRequest(self.settings.request())));
        }
        self.waiting.insert(node, info);
    }

    /// A node left: it is no longer waited for (statistics it sent stay counted).
    pub fn handle_disconnect(&mut self, node: &str) {
        self.waiting.remove(node);
        self.applying.remove(node);
        self.asked.remove(node);
    }

    /// A node could not (or would not) answer the request for statistics: it is not
    /// counted, and waits for the agreed transform like a late joiner.
    pub fn handle_failed(&mut self, node: &str) {
        self.asked.remove(node);
    }

    /// A node's statistics.
    pub fn handle_stats(&mut self, node: &str, r: &StatsReport) -> Result<(), StatsRejection> {
        if self.agreed.is_some() {
            return Err(StatsRejection::Unexpected(
                "the transform is already agreed".into(),
            ));
        }
        let Some(info) = self.waiting.get(node) else {
            return Err(StatsRejection::Unexpected("node is not joining".into()));
        };
        if !self.asked.contains(node) || self.contributors.contains(node) {
            return Err(StatsRejection::Unexpected(
                "not asked, or already counted".into(),
            ));
        }
        let st = validate_report(r, &self.settings, info.num_examples)?;
        self.total
            .merge(&st)
            .map_err(|e| StatsRejection::Implausible(e.to_string()))?;
        self.asked.remove(node);
        self.contributors.insert(node.to_string());
        Ok(())
    }

    /// Whether enough statistics are in and no transform is agreed yet.
    pub fn ready(&self) -> bool {
        self.agreed.is_none() && self.contributors.len() >= self.settings.min_contributors
    }

    /// Agrees the transform from the statistics so far (adding the server's noise with DP
    /// on in `central` mode). Does not send it: make it durable first, then [`publish`].
    ///
    /// [`publish`]: StatsExchange::publish
    pub fn agree(
        &mut self,
        noise: &mut dyn GaussianNoise,
    ) -> Result<&Standardizer, StandardizeError> {
        let mut total = self.total.clone();
        if let (Some(z), false) = (self.settings.noise_multiplier, self.settings.local) {
            total.release(z, noise)?;
        }
        let s = Standardizer::from_stats(&total, self.settings.bounds.as_ref())?;
        Ok(self.agreed.insert(s))
    }

    /// Sends the agreed transform to every waiting node.
    pub fn publish(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        for (n, info) in waiting {
            self.send_transform(n, info);
        }
        self.asked.clear();
    }

    /// A node applied the transform over `features` features: hand it to the coordinator
    /// (returned with what it declared at join). `Err`: not expected, or the wrong size.
    pub fn handle_standardized(
        &mut self,
        node: &str,
        features: u32,
    ) -> Result<(NodeId, NodeInfo), StatsRejection> {
        if features as usize != self.settings.dim {
            self.applying.remove(node);
            return Err(StatsRejection::Shape {
                what: "standardized features",
                expected: self.settings.dim,
                got: features as usize,
            });
        }
        match self.applying.remove_entry(node) {
            Some(x) => Ok(x),
            None => Err(StatsRejection::Unexpected(
                "acknowledged a transform it was not sent".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpfl_ml::Dataset;

    fn settings(dim: usize, classes: usize, min: usize) -> ExchangeSettings {
        ExchangeSettings {
            spec_hash: [7; 32],
            dim,
            classes,
            bounds: None,
            noise_multiplier: None,
            local: false,
            min_contributors: min,
        }
    }

    fn info(n: u64) -> NodeInfo {
        NodeInfo {
            num_examples: n,
            num_eval_examples: 0,
        }
    }

    fn drain(x: &mut StatsExchange) -> Vec<(NodeId, Header)> {
        std::iter::from_fn(|| x.poll_message()).collect()
    }

    struct NoNoise;
    impl GaussianNoise for NoNoise {
        fn add_noise(&mut self, _: &mut [f32], _: f64) -> Result<(), dpfl_common::dp::NoiseError> {
            Ok(())
        }
        fn name(&self) -> &'static str {
            "none"
        }
    }

    /// Three differently scaled, label-skewed tables; the agreed transform equals the
    /// pooled mean and standard deviation (two-pass, f64) to float precision.
    #[test]
    fn exchange_agrees_the_pooled_statistics_and_serves_late_joiners() {
        let part = |n: usize, scale: f32, shift: f32, label: i64| {
            let f: Vec<f32> = (0..n * 2)
                .map(|i| shift + scale * ((i * 37 % 101) as f32))
                .collect();
            Dataset::new(f, vec![label; n], 2).unwrap()
        };
        let parts = [
            part(30, 1.0, 0.0, 0),
            part(70, 100.0, 5.0, 1),
            part(50, 0.01, -3.0, 1),
        ];
        let mut x = StatsExchange::new(settings(2, 2, 3));
        for (i, p) in parts.iter().enumerate() {
            x.handle_join(format!("n{i}"), info(p.len() as u64));
        }
        let asked = drain(&mut x);
        assert_eq!(asked.len(), 3);
        assert!(asked.iter().all(
            |(_, h)| matches!(h, Header::StatsRequest(r) if r.lo.is_empty() && !r.normalized)
        ));
        for (i, p) in parts.iter().enumerate() {
            assert!(!x.ready());
            let r = FeatureStats::of(p, 2).to_report([7; 32], false, false);
            x.handle_stats(&format!("n{i}"), &r).unwrap();
        }
        assert!(x.ready());
        let s = x.agree(&mut NoNoise).unwrap().clone();
        // Pooled reference: two passes over all rows in f64.
        let rows: Vec<&[f32]> = parts
            .iter()
            .flat_map(|p| p.features.chunks(2).collect::<Vec<_>>())
            .collect();
        for j in 0..2 {
            let n = rows.len() as f64;
            let m = rows.iter().map(|r| r[j] as f64).sum::<f64>() / n;
            let v = rows.iter().map(|r| (r[j] as f64 - m).powi(2)).sum::<f64>() / n;
            assert!((s.mean[j] - m).abs() <= 1e-9 * m.abs().max(1.0), "{j}");
            assert!((s.std[j] - v.sqrt()).abs() <= 1e-7 * v.sqrt(), "{j}");
        }
        assert!(drain(&mut x).is_empty(), "nothing leaves before publish");
        x.publish();
        let sent = drain(&mut x);
        assert_eq!(sent.len(), 3);
        assert!(sent
            .iter()
            .all(|(_, h)| matches!(h, Header::Standardize(t) if t.mean == s.mean)));
        // A late joiner gets the agreed transform and is not asked for statistics.
        x.handle_join("late".into(), info(5));
        let late = drain(&mut x);
        assert!(matches!(&late[..], [(n, Header::Standardize(_))] if n == "late"));
        let r = FeatureStats::of(&parts[0], 2).to_report([7; 32], false, false);
        assert!(matches!(
            x.handle_stats("late", &r),
            Err(StatsRejection::Unexpected(_))
        ));
        // Acknowledged nodes go to the coordinator with what they declared.
        assert_eq!(
            x.handle_standardized("late", 2).unwrap(),
            ("late".into(), info(5))
        );
        assert!(x.handle_standardized("late", 2).is_err(), "only once");
        assert!(x.handle_standardized("n0", 3).is_err(), "wrong size");
    }

    #[test]
    fn reports_are_validated_against_the_request_and_the_declared_size() {
        let s = settings(2, 2, 1);
        let d = Dataset::new(vec![1.0, 2.0, 3.0, 4.0], vec![0, 1], 2).unwrap();
        let good = FeatureStats::of(&d, 2).to_report([7; 32], false, false);
        assert!(validate_report(&good, &s, 2).is_ok());
        let bad = |f: &dyn Fn(&mut StatsReport), rows: u64| {
            let mut r = good.clone();
            f(&mut r);
            validate_report(&r, &s, rows).unwrap_err()
        };
        assert_eq!(bad(&|r| r.spec_hash = [0; 32], 2), StatsRejection::SpecHash);
        assert!(matches!(
            bad(&|r| r.sum.push(1.0), 2),
            StatsRejection::Shape { what: "sum", .. }
        ));
        assert!(matches!(
            bad(&|r| r.label_counts.pop().map(|_| ()).unwrap_or(()), 2),
            StatsRejection::Shape { .. }
        ));
        assert!(matches!(
            bad(&|r| r.sum[0] = f64::NAN, 2),
            StatsRejection::Implausible(_)
        ));
        assert!(matches!(
            bad(&|r| r.sum_sq[1] = f64::INFINITY, 2),
            StatsRejection::Implausible(_)
        ));
        // More rows than the node declared at join.
        assert!(matches!(bad(&|_| (), 1), StatsRejection::Implausible(_)));
        assert!(matches!(
            bad(&|r| r.count[0] = -1.0, 2),
            StatsRejection::Implausible(_)
        ));
        // A sum too large for its sum of squares.
        assert!(matches!(
            bad(&|r| r.sum[0] = 100.0, 2),
            StatsRejection::Implausible(_)
        ));
        assert!(matches!(
            bad(&|r| r.noised = true, 2),
            StatsRejection::Form(_)
        ));
        assert!(matches!(
            bad(&|r| r.bounded = true, 2),
            StatsRejection::Form(_)
        ));
        // Bounded unit values: sum <= count, sum of squares <= sum.
        let b = Bounds::parse("0:10", 2).unwrap();
        let sb = ExchangeSettings {
            bounds: Some(b.clone()),
            ..settings(2, 2, 1)
        };
        let ok = FeatureStats::of_bounded(&d, 2, &b)
            .unwrap()
            .to_report([7; 32], false, false);
        assert!(validate_report(&ok, &sb, 2).is_ok());
        let mut r = ok.clone();
        r.sum[1] = 3.0;
        assert!(validate_report(&r, &sb, 2).is_err());
        // Noised statistics: only finiteness (the noise bounds them).
        let sl = ExchangeSettings {
            bounds: Some(b),
            noise_multiplier: Some(1.0),
            local: true,
            ..settings(2, 2, 1)
        };
        let mut r = ok;
        (r.normalized, r.noised) = (true, true);
        r.sum[0] = -7.5;
        assert!(validate_report(&r, &sl, 2).is_ok());
    }

    /// The largest statistics and transform the configuration allows fit a header.
    #[test]
    fn the_largest_allowed_messages_fit_a_header() {
        use crate::config::MAX_STANDARDIZE_FEATURES as D;
        use dpfl_common::wire::{decode, encode, StandardizeSpec, MAX_HEADER_BYTES, PREFIX_BYTES};
        let v = |n: usize| vec![-1.234_567_890_123e300; n];
        let stats = Header::Stats(StatsReport {
            spec_hash: [1; 32],
            count: v(D),
            sum: v(D),
            sum_sq: v(D),
            label_counts: v(D),
            bounded: true,
            normalized: true,
            noised: true,
        });
        let spec = Header::Standardize(StandardizeSpec {
            spec_hash: [1; 32],
            mean: v(D),
            std: v(D),
            lo: v(D),
            hi: v(D),
        });
        let req = Header::StatsRequest(StatsRequest {
            spec_hash: [1; 32],
            lo: v(D),
            hi: v(D),
            local_noise_multiplier: Some(1.0),
            central_noise_multiplier: None,
            normalized: true,
        });
        for h in [stats, spec, req] {
            let bytes = encode(&h, &[]);
            assert!(
                bytes.len() <= PREFIX_BYTES + MAX_HEADER_BYTES,
                "{}",
                bytes.len()
            );
            assert_eq!(decode(&bytes, 1 << 20).unwrap().header, h);
        }
    }

    #[test]
    fn nodes_that_leave_or_fail_are_not_waited_for_and_counted_once() {
        let mut x = StatsExchange::new(settings(1, 2, 2));
        let d = Dataset::new(vec![1.0, 2.0], vec![0, 1], 1).unwrap();
        let r = FeatureStats::of(&d, 2).to_report([7; 32], false, false);
        x.handle_join("a".into(), info(2));
        x.handle_join("b".into(), info(2));
        x.handle_stats("a", &r).unwrap();
        assert!(x.handle_stats("a", &r).is_err(), "counted once");
        // A reconnect of a counted node is not asked again.
        drain(&mut x);
        x.handle_join("a".into(), info(2));
        assert!(drain(&mut x).is_empty());
        x.handle_failed("b");
        assert!(
            x.handle_stats("b", &r).is_err(),
            "a refused request is closed"
        );
        x.handle_disconnect("b");
        x.handle_join("c".into(), info(2));
        assert!(matches!(&drain(&mut x)[..], [(n, Header::StatsRequest(_))] if n == "c"));
        x.handle_stats("c", &r).unwrap();
        assert!(x.ready());
        x.agree(&mut NoNoise).unwrap();
        x.publish();
        let sent: Vec<NodeId> = drain(&mut x).into_iter().map(|(n, _)| n).collect();
        assert_eq!(sent, vec!["a".to_string(), "c".to_string()]);
        assert_eq!(x.contributors().len(), 2);
    }
}
