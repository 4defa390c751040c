//! A client node's life: connect with its certificate, say hello, then serve the server's
//! requests (train, evaluate) until it says training is over; reconnect with exponential
//! backoff and jitter whenever the connection is lost.
//!
//! The node owns its privacy ([`crate::budget`]): it checks every round's noise against
//! its own floor and its own budget, records each release on its disk before the update
//! leaves, and in `local` mode refuses evaluation requests (an exact loss and accuracy on
//! its data, for any model the server picks, would bypass the noise).

use crate::budget::{Budget, Policy, Release};
use crate::worker::Worker;
use dpfl_certs::Credentials;
use dpfl_common::config::DpMode;
use dpfl_common::model::short_hex;
use dpfl_common::wire::{self, EvalResult, Header, Hello, Message, Welcome};
use rand::Rng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Client settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Server address (ignored when `server_host` is set).
    pub server: SocketAddr,
    /// `host:port`, resolved before every attempt.
    pub server_host: Option<String>,
    /// Longest wait for one connection attempt.
    pub connect_timeout: Duration,
    /// Name the server certificate must carry (a SAN).
    pub server_name: String,
    /// CA, certificate and key.
    pub credentials: Credentials,
    /// DP mode this node agrees to; the server must run the same.
    pub dp_mode: DpMode,
    /// The node's own privacy policy (noise floor, budget, delta).
    pub policy: Policy,
    /// Where the node keeps its privacy spend (`None`: in memory, tests only).
    pub privacy_state: Option<PathBuf>,
    /// Largest message this node accepts from the server. The read limit is derived from
    /// the model in the server's welcome (`wire::max_message_bytes`); a federation whose
    /// model needs more than this is refused. Before the welcome only hello-sized messages
    /// are read.
    pub max_message_bytes: usize,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// First reconnection delay.
    pub backoff_initial: Duration,
    /// Longest reconnection delay.
    pub backoff_max: Duration,
    /// Give up after this long without a working connection.
    pub give_up_after: Duration,
    /// Features per example in the node's data.
    pub input_dim: usize,
    /// Largest label + 1 in the node's data.
    pub num_classes: usize,
    /// Training examples (declared in the hello).
    pub num_examples: usize,
    /// Held-out examples (declared in the hello).
    pub num_eval_examples: usize,
    /// Class names of the node's data (CSV `classes=`), declared at join; empty for
    /// integer labels.
    pub class_names: Vec<String>,
    /// Where to append a JSON line per round (the node's own privacy record).
    pub log_file: Option<PathBuf>,
    /// The model this node agrees to train (`--model`, `--layers`); `None`: whatever the
    /// server announces. A server announcing another spec hash is refused.
    pub model: Option<dpfl_common::ModelSpec>,
    /// Take part only in securely aggregated exchanges (see
    /// [`crate::ClientConfig::secure_aggregation`]).
    pub secure_aggregation: bool,
    /// The secure-aggregation threat this node checks every announced graph against
    /// ([`crate::ClientConfig::secagg_threat`]).
    pub secagg_threat: dpfl_secagg::params::ThreatModel,
}

/// Errors that end a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The server refused this node (admission, DP mode, model); retrying cannot help.
    #[error("server refused this node: {0}")]
    Refused(String),
    /// The TLS handshake failed because of certificates.
    #[error("TLS authentication failed: {0}")]
    Authentication(String),
    /// No working connection for longer than `give_up_after`.
    #[error("gave up after {secs:.1}s without a working connection; last error: {last}")]
    GaveUp {
        /// Seconds waited.
        secs: f64,
        /// Last error seen.
        last: String,
    },
    /// Local set-up problem.
    #[error("{0}")]
    Setup(String),
}

/// What a node reports when training ends.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSummary {
    /// Node name (from the server's welcome).
    pub node: String,
    /// Rounds this node trained in.
    pub rounds_trained: u64,
    /// The server's reason for finishing.
    pub finish_reason: String,
    /// Epsilon spent by the node's data, by its own books ([`crate::budget`]).
    pub epsilon: Option<f64>,
    /// Connections made (1 + reconnections).
    pub connections: u32,
}

enum Outcome {
    Finished(String),
    Lost(String),
}

enum Fatal {
    Refused(String),
    Auth(String),
    Setup(String),
}

/// Runs a node until the server finishes training.
pub async fn run(cfg: NodeConfig, worker: Worker) -> Result<NodeSummary, NodeError> {
    // Until the welcome the server can only send a hello-sized message; `session` opens
    // the connection window once the model (hence the largest message) is known.
    let windows = dpfl_certs::quic::Windows::for_messages(cfg.max_message_bytes as u64)
        .with_connection(wire::HELLO_WINDOW_BYTES as u64);
    let endpoint = dpfl_certs::quic::client_endpoint_with(
        &cfg.credentials,
        wire::ALPN,
        cfg.idle_timeout,
        windows,
    )
    .map_err(|e| NodeError::Setup(e.to_string()))?;
    let mut summary = NodeSummary {
        node: String::new(),
        rounds_trained: 0,
        finish_reason: String::new(),
        epsilon: None,
        connections: 0,
    };
    let mut budget = Budget::open(cfg.policy.clone(), cfg.privacy_state.clone())
        .map_err(|e| NodeError::Setup(e.to_string()))?;
    if let Ok(e) = budget.epsilon() {
        if e > 0.0 {
            tracing::info!(
                "privacy spent by this node's data so far (its own books): epsilon {e:.4}"
            );
        }
    }
    let mut backoff = cfg.backoff_initial;
    let mut last_ok = Instant::now();
    // Secure aggregation state lives as long as the process: protocol round ids the node
    // has seen stay refused across reconnections.
    let mut secure: Option<crate::secure::SecureNode> = None;
    let target = cfg
        .server_host
        .clone()
        .unwrap_or_else(|| cfg.server.to_string());
    loop {
        let result = session(
            &cfg,
            &endpoint,
            &worker,
            &mut summary,
            &mut budget,
            &mut last_ok,
            &mut secure,
        )
        .await;
        match result {
            Ok(Outcome::Finished(reason)) => {
                summary.finish_reason = reason;
                endpoint.close(0u32.into(), b"done");
                return Ok(summary);
            }
            Ok(Outcome::Lost(e)) => {
                let waited = last_ok.elapsed();
                let left = cfg.give_up_after.saturating_sub(waited);
                if left.is_zero() {
                    return Err(NodeError::GaveUp {
                        secs: waited.as_secs_f64(),
                        last: format!("{target}: {e}"),
                    });
                }
                // Full jitter: uniform in [backoff/2, backoff], never past the give-up time.
                let jitter = rand::thread_rng().gen_range(0.5..=1.0);
                let sleep = backoff.mul_f64(jitter).min(left);
                tracing::warn!(
                    "server {target}: {e}; retrying in {:.1}s (giving up in {:.0}s)",
                    sleep.as_secs_f64(),
                    left.as_secs_f64()
                );
                tokio::time::sleep(sleep).await;
                backoff = (backoff * 2).min(cfg.backoff_max);
            }
            Err(Fatal::Refused(m)) => return Err(NodeError::Refused(m)),
            Err(Fatal::Auth(m)) => return Err(NodeError::Authentication(m)),
            Err(Fatal::Setup(m)) => return Err(NodeError::Setup(m)),
        }
        if last_ok.elapsed() < Duration::from_millis(10) {
            backoff = cfg.backoff_initial;
        }
    }
}

fn is_auth_error(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::TransportError(t) => is_crypto_code(u64::from(t.code)),
        quinn::ConnectionError::ConnectionClosed(c) => is_crypto_code(u64::from(c.error_code)),
        _ => false,
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100-0x1ff.
fn is_crypto_code(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

async fn session(
    cfg: &NodeConfig,
    endpoint: &quinn::Endpoint,
    worker: &Worker,
    summary: &mut NodeSummary,
    budget: &mut Budget,
    last_ok: &mut Instant,
    secure: &mut Option<crate::secure::SecureNode>,
) -> Result<Outcome, Fatal> {
    // Every wait is bounded by what is left before the node gives up.
    let left = || {
        cfg.give_up_after
            .saturating_sub(last_ok.elapsed())
            .max(Duration::from_millis(50))
    };
    let server = match &cfg.server_host {
        None => cfg.server,
        Some(host) => {
            let wait = left();
            match tokio::time::timeout(wait, tokio::net::lookup_host(host.as_str())).await {
                Err(_) => {
                    return Ok(Outcome::Lost(format!(
                        "cannot resolve {host}: no answer within {:.1}s",
                        wait.as_secs_f64()
                    )))
                }
                Ok(Err(e)) => return Ok(Outcome::Lost(format!("cannot resolve {host}: {e}"))),
                Ok(Ok(mut addrs)) => match addrs.next() {
                    Some(a) => a,
                    None => return Ok(Outcome::Lost(format!("{host} resolves to no address"))),
                },
            }
        }
    };
    let connecting = match endpoint.connect(server, &cfg.server_name) {
        Ok(c) => c,
        Err(e) => {
            return Err(Fatal::Setup(format!(
                "cannot connect to {server} as {:?}: {e}",
                cfg.server_name
            )))
        }
    };
    let wait = cfg.connect_timeout.min(left());
    let conn = match tokio::time::timeout(wait, connecting).await {
        Err(_) => {
            return Ok(Outcome::Lost(format!(
                "no answer from {server} within {:.1}s (is the server running, and UDP port {} \
                 reachable?)",
                wait.as_secs_f64(),
                server.port()
            )))
        }
        Ok(Err(e)) if is_auth_error(&e) => {
            return Err(Fatal::Auth(format!(
                "{server}: {}",
                dpfl_certs::explain_tls_error(&e.to_string())
            )))
        }
        Ok(Err(e)) => return Ok(Outcome::Lost(format!("{server}: {e}"))),
        Ok(Ok(c)) => c,
    };
    summary.connections += 1;
    let welcome = match hello(cfg, &conn).await {
        Ok(w) => w,
        Err(HelloError::Refused(m)) => return Err(Fatal::Refused(m)),
        Err(HelloError::Connection(e)) if is_auth_error(&e) => {
            return Err(Fatal::Auth(e.to_string()))
        }
        Err(HelloError::Connection(e)) => return Ok(Outcome::Lost(e.to_string())),
        Err(HelloError::Other(m)) => return Ok(Outcome::Lost(m)),
    };
    if welcome.spec.validate().is_err() || welcome.spec.hash() != welcome.spec_hash {
        return Err(Fatal::Refused(
            "server announced an invalid model spec".into(),
        ));
    }
    if let Some(mine) = &cfg.model {
        if mine.hash() != welcome.spec_hash {
            return Err(Fatal::Refused(format!(
                "the server trains the model {} (spec {}), this node is configured for {} \
                 (spec {}); start the node with --model {} or ask the operator which model \
                 the federation trains",
                welcome.spec,
                short_hex(&welcome.spec_hash),
                mine,
                short_hex(&mine.hash()),
                welcome.spec.to_arg()
            )));
        }
    }
    if welcome.dp.mode != cfg.dp_mode {
        return Err(Fatal::Refused(format!(
            "server runs dp mode `{}`, this node is configured for `{}`",
            welcome.dp.mode, cfg.dp_mode
        )));
    }
    if welcome.dp.mode.is_private()
        && (welcome.dp.noise_multiplier.is_nan()
            || welcome.dp.noise_multiplier < budget.policy().min_noise_multiplier)
    {
        return Err(Fatal::Refused(format!(
            "this node refuses the federation: its noise multiplier {} is below the node's \
             minimum {} (--min-noise-multiplier)",
            welcome.dp.noise_multiplier,
            budget.policy().min_noise_multiplier
        )));
    }
    let federation = format!("{}|{}", cfg.server_name, short_hex(&welcome.spec_hash));
    // Requests carry at most the model's parameters: read nothing larger, and let the
    // server have no more than two such messages in flight.
    let limit = wire::max_message_bytes(welcome.spec.num_params());
    if limit > cfg.max_message_bytes {
        return Err(Fatal::Refused(format!(
            "the server's model needs messages of {limit} bytes, above this node's \
             max_message_bytes {}",
            cfg.max_message_bytes
        )));
    }
    dpfl_certs::quic::open_windows(&conn, dpfl_certs::quic::Windows::for_messages(limit as u64));
    // The node's own spec when it has one (same hash; it knows where its module file is).
    worker
        .setup(cfg.model.clone().unwrap_or_else(|| welcome.spec.clone()))
        .await
        .map_err(Fatal::Setup)?;
    summary.node = welcome.node.clone();
    *last_ok = Instant::now();
    tracing::info!(
        node = %welcome.node,
        model = %welcome.spec,
        spec = %short_hex(&welcome.spec_hash),
        dp = %welcome.dp.mode,
        "joined the federation"
    );
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return Ok(Outcome::Lost(e.to_string())),
        };
        *last_ok = Instant::now();
        let msg = match wire::read_message(&mut recv, limit).await {
            Ok(m) => m,
            Err(wire::ReadError::Io(e)) => {
                tracing::warn!("could not read request: {e}");
                continue;
            }
            // An empty stream is the server's liveness probe (another connection claimed
            // this identity); the QUIC acknowledgement already answered it.
            Err(wire::ReadError::Decode(wire::DecodeError::Truncated { got: 0 })) => {
                tracing::debug!("liveness probe from the server");
                continue;
            }
            Err(wire::ReadError::Decode(e)) => {
                tracing::warn!("malformed request from the server: {e}");
                continue;
            }
        };
        let reply = match msg.header {
            Header::Finish(f) => {
                tracing::info!(
                    rounds = f.rounds_completed,
                    "server finished training: {}",
                    f.reason
                );
                let _ = send.finish();
                conn.close(0u32.into(), b"finished");
                return Ok(Outcome::Finished(f.reason));
            }
            Header::Train(req) => {
                let round = req.round;
                let release = match (req.privacy.mode, &req.secure_aggregation) {
                    (DpMode::Distributed, Some(spec)) => {
                        spec.distributed.map(|d| Release::Distributed {
                            federation: federation.clone(),
                            params: d.params,
                        })
                    }
                    _ => Release::of(
                        req.privacy.mode,
                        &federation,
                        welcome.dp.sampling_rate,
                        req.privacy.noise_multiplier,
                        round,
                    ),
                };
                let refusal = check_train(&welcome, &req, msg.payload.len())
                    .and_then(|()| {
                        if cfg.secure_aggregation && req.secure_aggregation.is_none() {
                            Err("this node takes part only in securely aggregated rounds \
                                 (--secure-aggregation); the request is not"
                                .to_string())
                        } else {
                            Ok(())
                        }
                    })
                    .and_then(|()| match &release {
                        Some(r) => budget.check(r).map(|_| ()).map_err(|e| e.to_string()),
                        None => Ok(()),
                    });
                match refusal {
                    Err(reason) => {
                        let reason =
                            format!("node {} refused round {round}: {reason}", welcome.node);
                        tracing::warn!("{reason}");
                        Header::Failed { round, reason }
                    }
                    Ok(()) => {
                        let req_copy = req.clone();
                        match worker.train(req, msg.payload).await {
                            Err(reason) => Header::Failed { round, reason },
                            Ok(done) => {
                                // The spend is on disk before the update leaves.
                                if let Some(r) = &release {
                                    match budget.record(r) {
                                        Ok(e) => summary.epsilon = Some(e),
                                        Err(e) => {
                                            let reason = format!(
                                                "node {} withheld its update: cannot record the \
                                                 privacy spend: {e}",
                                                welcome.node
                                            );
                                            tracing::error!("{reason}");
                                            let failed = Header::Failed { round, reason };
                                            if let Err(e) =
                                                write_reply(&mut send, &wire::encode(&failed, &[]))
                                                    .await
                                            {
                                                return Ok(Outcome::Lost(e));
                                            }
                                            continue;
                                        }
                                    }
                                }
                                summary.rounds_trained += 1;
                                let meta = done.meta(&req_copy);
                                let bytes = match req_copy.secure_aggregation {
                                    None => {
                                        wire::encode(&Header::Update(meta), done.delta.as_slice())
                                    }
                                    Some(spec) => {
                                        // Only `Held` leaves now; the update leaves masked,
                                        // in the stages that follow.
                                        if secure.is_none() {
                                            match crate::secure::SecureNode::new(
                                                &welcome.node,
                                                &cfg.credentials,
                                                cfg.secagg_threat,
                                            ) {
                                                Ok(s) => *secure = Some(s),
                                                Err(e) => {
                                                    return Err(Fatal::Setup(format!(
                                                        "secure aggregation: {e}"
                                                    )))
                                                }
                                            }
                                        }
                                        if let Some(s) = secure.as_mut() {
                                            s.hold(round, spec, done.delta.as_slice().to_vec());
                                        }
                                        wire::encode(&Header::Held(meta), &[])
                                    }
                                };
                                let eps = summary
                                    .epsilon
                                    .map_or(String::new(), |e| format!(", own epsilon {e:.4}"));
                                tracing::info!(
                                    round,
                                    "trained {} steps on {} examples: loss {:.4} acc {:.4} in {:.2}s (+{:.2}s privacy){eps}",
                                    done.outcome.steps,
                                    done.outcome.num_examples,
                                    done.outcome.loss,
                                    done.outcome.accuracy,
                                    done.train_seconds,
                                    done.privatize_seconds
                                );
                                log_round(cfg, round, summary, &done);
                                if let Err(e) = write_reply(&mut send, &bytes).await {
                                    return Ok(Outcome::Lost(e));
                                }
                                continue;
                            }
                        }
                    }
                }
            }
            Header::Evaluate(req)
                if matches!(welcome.dp.mode, DpMode::Local | DpMode::Distributed) =>
            {
                Header::Failed {
                    round: req.round,
                    reason: format!(
                        "node {} refuses evaluation in {} DP mode: exact loss, accuracy and \
                         count on its data would bypass the noise that protects it from the \
                         server",
                        welcome.node, welcome.dp.mode
                    ),
                }
            }
            Header::Evaluate(req) => {
                if req.spec_hash != welcome.spec_hash
                    || msg.payload.len() != welcome.spec.num_params()
                {
                    Header::Failed {
                        round: req.round,
                        reason: "evaluate request does not match the agreed model".into(),
                    }
                } else {
                    match worker.evaluate(msg.payload).await {
                        Ok(e) => Header::EvalResult(EvalResult {
                            round: req.round,
                            loss: e.loss,
                            accuracy: e.accuracy,
                            num_examples: e.num_examples,
                        }),
                        Err(reason) => Header::Failed {
                            round: req.round,
                            reason,
                        },
                    }
                }
            }
            Header::SecAggRequest(frame) => {
                let round = frame.round;
                let answer = secagg_stage(
                    secure.as_mut(),
                    &frame,
                    &msg.payload,
                    welcome.spec.num_params(),
                );
                let bytes = match answer {
                    Ok((frame, payload)) => wire::encode(&Header::SecAggAnswer(frame), &payload),
                    Err(reason) => {
                        let reason = format!("node {}: secure aggregation: {reason}", welcome.node);
                        tracing::warn!(round, "{reason}");
                        wire::encode(&Header::Failed { round, reason }, &[])
                    }
                };
                if let Err(e) = write_reply(&mut send, &bytes).await {
                    return Ok(Outcome::Lost(e));
                }
                continue;
            }
            Header::StatsRequest(req) => {
                let reply =
                    match stats_answer(cfg, &welcome, &federation, worker, budget, secure, &req)
                        .await
                    {
                        Ok(r) => r,
                        Err(reason) => {
                            let reason = format!(
                                "node {} refused to send its feature statistics: {reason}",
                                welcome.node
                            );
                            tracing::warn!("{reason}");
                            Header::Failed {
                                round: wire::STATS_ROUND,
                                reason,
                            }
                        }
                    };
                if let Some(e) = budget_epsilon(budget, &welcome) {
                    summary.epsilon = Some(e);
                }
                reply
            }
            Header::Standardize(spec) => {
                let applied = if spec.spec_hash != welcome.spec_hash {
                    Err("the transform names another model".to_string())
                } else {
                    match dpfl_ml::standardize::Standardizer::from_spec(&spec, cfg.input_dim) {
                        Err(e) => Err(e.to_string()),
                        Ok(s) => worker.standardize(s).await,
                    }
                };
                match applied {
                    Ok(features) => {
                        tracing::info!(
                            features,
                            "standardised the data with the federation's mean and standard deviation"
                        );
                        Header::Standardized { features }
                    }
                    Err(reason) => {
                        let reason = format!("node {} cannot standardise: {reason}", welcome.node);
                        tracing::warn!("{reason}");
                        Header::Failed {
                            round: wire::STATS_ROUND,
                            reason,
                        }
                    }
                }
            }
            other => {
                tracing::warn!("ignoring unexpected `{}` message", other.name());
                continue;
            }
        };
        if let Err(e) = write_reply(&mut send, &wire::encode(&reply, &[])).await {
            return Ok(Outcome::Lost(e));
        }
    }
}

/// The node's epsilon from its own books, with DP on (for the summary).
fn budget_epsilon(budget: &Budget, welcome: &Welcome) -> Option<f64> {
    welcome
        .dp
        .mode
        .is_private()
        .then(|| budget.epsilon().ok())
        .flatten()
}

/// Answers a request for feature statistics: checks it against the model and, with DP
/// on, against the node's own policy (bounds, per-row normalisation, a noise multiplier at
/// or above its floor, its budget; in `distributed` mode the integer noise share's public
/// parameters with `check_share`), records the release in its books before anything
/// leaves, and computes the statistics (noised by the node itself in `local` mode). With
/// secure aggregation the statistics stay here for their secure sum and the answer is
/// [`Header::StatsHeld`]; a node configured for secure aggregation refuses a request for
/// them in the clear.
async fn stats_answer(
    cfg: &NodeConfig,
    welcome: &Welcome,
    federation: &str,
    worker: &Worker,
    budget: &mut Budget,
    secure: &mut Option<crate::secure::SecureNode>,
    req: &wire::StatsRequest,
) -> Result<Header, String> {
    if req.spec_hash != welcome.spec_hash {
        return Err("the request names another model".into());
    }
    let needs_secure = cfg.secure_aggregation || welcome.dp.mode == DpMode::Distributed;
    match &req.secure_aggregation {
        None if needs_secure => {
            return Err(
                "this node is configured for secure aggregation (--secure-aggregation): its \
                 statistics leave it only masked, inside a secure sum, and the request asks \
                 for them in the clear"
                    .into(),
            )
        }
        Some(s) => {
            s.validate()?;
            if req.local_noise_multiplier.is_some() {
                return Err("local noise and a secure sum of the statistics do not combine".into());
            }
            if s.distributed.is_some() != (welcome.dp.mode == DpMode::Distributed) {
                return Err(format!(
                    "integer noise shares for the statistics are for dp mode `distributed` \
                     only; the federation's is `{}`",
                    welcome.dp.mode
                ));
            }
        }
        None => {}
    }
    let bounds = match (req.lo.is_empty(), req.hi.is_empty()) {
        (true, true) => None,
        _ => {
            let b = dpfl_ml::standardize::Bounds::new(req.lo.clone(), req.hi.clone())
                .map_err(|e| e.to_string())?;
            if b.lo.len() != cfg.input_dim {
                return Err(format!(
                    "{} ranges for {} features",
                    b.lo.len(),
                    cfg.input_dim
                ));
            }
            Some(b)
        }
    };
    let mode = welcome.dp.mode;
    let release = match (
        mode,
        req.local_noise_multiplier,
        req.central_noise_multiplier,
    ) {
        (DpMode::None, None, None) => None,
        (DpMode::Local, Some(z), None) => Some(Release::Local {
            noise_multiplier: z,
        }),
        (DpMode::Central, None, Some(z)) => Some(Release::Central {
            federation: format!("{federation}|statistics"),
            sampling_rate: 1.0,
            noise_multiplier: z,
            round: 1,
        }),
        // The node adds its own integer noise share; its floors on z and on the
        // contributors the noise is accounted over, and its budget, are checked below
        // (`check_share`), as for a training round.
        (DpMode::Distributed, None, None) => {
            match req.secure_aggregation.and_then(|s| s.distributed) {
                Some(d) => Some(Release::Distributed {
                    federation: format!("{federation}|statistics"),
                    params: d.params,
                }),
                None => {
                    return Err(
                        "dp mode `distributed`: the statistics' request carries no noise \
                         parameters"
                            .into(),
                    )
                }
            }
        }
        _ => {
            return Err(format!(
                "the request's noise (node-side {:?}, server-side {:?}) does not fit dp mode \
                 `{mode}`",
                req.local_noise_multiplier, req.central_noise_multiplier
            ))
        }
    };
    if release.is_some() && (bounds.is_none() || !req.normalized) {
        return Err(
            "with DP on, statistics leave only clipped to public bounds and divided \
                    by the row count (their sensitivity is otherwise unbounded)"
                .into(),
        );
    }
    if let Some(r) = &release {
        budget.check(r).map_err(|e| e.to_string())?;
    }
    let job = crate::worker::StatsJob {
        bounds,
        classes: welcome.spec.outputs(),
        normalized: req.normalized,
        noise_multiplier: req.local_noise_multiplier,
    };
    if req.secure_aggregation.is_some() && job.bounds.is_none() {
        return Err("a secure sum of the statistics needs public bounds (its range)".into());
    }
    let st = worker.stats(job).await?;
    if let Some(spec) = req.secure_aggregation {
        crate::secure::SecureNode::check_stats(spec, &st.to_vector())?;
        if secure.is_none() {
            *secure = Some(crate::secure::SecureNode::new(
                &welcome.node,
                &cfg.credentials,
                cfg.secagg_threat,
            )?);
        }
        if let Some(s) = secure.as_ref() {
            s.may_hold_stats()?;
        }
    }
    // The spend is on disk before the statistics leave (masked or not) and, with secure
    // aggregation, before they are held (a setup could otherwise take them).
    if let Some(r) = &release {
        budget
            .record(r)
            .map_err(|e| format!("cannot record the privacy spend: {e}"))?;
    }
    if let Some(spec) = req.secure_aggregation {
        let s = secure.as_mut().ok_or("secure aggregation state missing")?;
        s.hold_stats(spec, st.to_vector())?;
        return Ok(Header::StatsHeld(wire::StatsHeld {
            spec_hash: welcome.spec_hash,
        }));
    }
    Ok(Header::Stats(st.to_report(
        welcome.spec_hash,
        req.normalized,
        req.local_noise_multiplier.is_some(),
    )))
}

/// Decodes one secure-aggregation stage (bounded), answers it, and frames the answer.
fn secagg_stage(
    secure: Option<&mut crate::secure::SecureNode>,
    frame: &wire::SecAggFrame,
    payload: &[f32],
    num_params: usize,
) -> Result<(wire::SecAggFrame, Vec<f32>), String> {
    let secure = secure.ok_or("no securely aggregated round is open on this node")?;
    let bytes = wire::payload_bytes(frame, payload).map_err(|e| e.to_string())?;
    // The wire read already bounded the bytes; the stage message may hold at most the
    // certificates of every participant the degree allows.
    let request =
        dpfl_secagg::transport::decode_to_node(&bytes, bytes.len(), dpfl_secagg::MAX_PARTICIPANTS)
            .map_err(|e| e.to_string())?;
    let answer = secure.handle(frame.round, num_params as u32, request)?;
    let out = dpfl_secagg::transport::encode_from_node(&answer).map_err(|e| e.to_string())?;
    wire::bytes_payload(frame.round, &out).ok_or_else(|| "empty stage answer".to_string())
}

fn log_round(cfg: &NodeConfig, round: u64, summary: &NodeSummary, done: &crate::worker::TrainDone) {
    let Some(path) = &cfg.log_file else { return };
    let line = serde_json::json!({
        "round": round,
        "rounds_joined": summary.rounds_trained,
        "epsilon": summary.epsilon,
        "loss": done.outcome.loss,
        "accuracy": done.outcome.accuracy,
        "train_seconds": done.train_seconds,
        "privacy_seconds": done.privatize_seconds,
    });
    use std::io::Write;
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = res {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
}

async fn write_reply(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), String> {
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}

/// Checks a train request against what was agreed in the handshake (the node's own
/// floor and budget are checked separately, by [`Budget::check`]).
fn check_train(welcome: &Welcome, req: &wire::TrainRequest, payload: usize) -> Result<(), String> {
    if req.spec_hash != welcome.spec_hash {
        return Err("train request for another model".into());
    }
    if payload != welcome.spec.num_params() {
        return Err(format!(
            "global model has {payload} values, expected {}",
            welcome.spec.num_params()
        ));
    }
    req.config.validate().map_err(|e| e.to_string())?;
    req.privacy.validate().map_err(|e| e.to_string())?;
    if let Some(spec) = &req.secure_aggregation {
        spec.validate()?;
        if req.privacy.mode == DpMode::Local {
            return Err("secure aggregation is not offered with local DP".into());
        }
    }
    // Distributed DP: the node adds its noise share only inside a securely aggregated
    // round, at the parameters of the round's privacy settings and this model.
    let distributed = req.secure_aggregation.as_ref().and_then(|s| s.distributed);
    match (req.privacy.mode, distributed) {
        (DpMode::Distributed, None) => {
            return Err(
                "distributed DP round without secure aggregation or its public parameters".into(),
            )
        }
        (DpMode::Distributed, Some(d)) => {
            let p = &d.params;
            if p.noise_multiplier != req.privacy.noise_multiplier
                || p.clip_norm != req.privacy.clip_norm
                || p.dim != welcome.spec.num_params()
            {
                return Err(format!(
                    "distributed DP parameters (z {}, C {}, dim {}) disagree with the round \
                     (z {}, C {}, dim {})",
                    p.noise_multiplier,
                    p.clip_norm,
                    p.dim,
                    req.privacy.noise_multiplier,
                    req.privacy.clip_norm,
                    welcome.spec.num_params()
                ));
            }
        }
        (_, Some(_)) => {
            return Err("distributed DP parameters in a round of another mode".into());
        }
        (_, None) => {}
    }
    if req.privacy.mode != welcome.dp.mode {
        return Err(format!(
            "round asks for dp mode `{}`, agreed `{}`",
            req.privacy.mode, welcome.dp.mode
        ));
    }
    if req.privacy.mode == DpMode::Local
        && (req.privacy.noise_multiplier.is_nan()
            || req.privacy.noise_multiplier < welcome.dp.noise_multiplier)
    {
        return Err(format!(
            "round asks for noise multiplier {}, below the agreed {}",
            req.privacy.noise_multiplier, welcome.dp.noise_multiplier
        ));
    }
    Ok(())
}

enum HelloError {
    Refused(String),
    Connection(quinn::ConnectionError),
    Other(String),
}

async fn hello(cfg: &NodeConfig, conn: &quinn::Connection) -> Result<Welcome, HelloError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(HelloError::Connection)?;
    let hello = Hello {
        software: format!("dpfl-client/{}", env!("CARGO_PKG_VERSION")),
        dp_mode: cfg.dp_mode,
        input_dim: cfg.input_dim as u32,
        num_classes: cfg.num_classes as u32,
        num_examples: cfg.num_examples as u64,
        num_eval_examples: cfg.num_eval_examples as u64,
        class_names: cfg.class_names.clone(),
    };
    send.write_all(&wire::encode(&Header::Hello(hello), &[]))
        .await
        .map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => HelloError::Connection(c),
            other => HelloError::Other(other.to_string()),
        })?;
    send.finish()
        .map_err(|e| HelloError::Other(e.to_string()))?;
    let answer = tokio::time::timeout(
        Duration::from_secs(15),
        wire::read_message(&mut recv, wire::MAX_HELLO_BYTES),
    )
    .await
    .map_err(|_| HelloError::Other("no welcome within 15s".into()))?;
    match answer {
        Ok(Message {
            header: Header::Welcome(w),
            ..
        }) => Ok(w),
        Ok(Message {
            header: Header::Refused(r),
            ..
        }) => Err(HelloError::Refused(format!("{:?}: {}", r.kind, r.detail))),
        Ok(m) => Err(HelloError::Other(format!(
            "expected welcome, got `{}`",
            m.header.name()
        ))),
        Err(wire::ReadError::Decode(e)) => {
            Err(HelloError::Other(format!("malformed welcome: {e}")))
        }
        Err(wire::ReadError::Io(e)) => {
            // quinn reports a lost connection (which may carry a TLS alert) inside the
            // I/O error; keep it so authentication failures stay recognisable.
            let lost = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<quinn::ReadError>());
            match lost {
                Some(quinn::ReadError::ConnectionLost(c)) => Err(HelloError::Connection(c.clone())),
                _ => Err(HelloError::Other(format!("reading the welcome: {e}"))),
            }
        }
    }
}
