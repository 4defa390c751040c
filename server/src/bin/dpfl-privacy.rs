//! `dpfl-privacy`: a planning calculator for people designing a deployment.
//!
//! - `dpfl-privacy epsilon --sampling-rate Q --noise-multiplier Z --steps T --delta D`
//!   prints the epsilon of T rounds of the Poisson-sampled Gaussian mechanism by every
//!   bound (RDP, opendp zCDP when q = 1, PLD), then `epsilon=<number>` (last line).
//! - `dpfl-privacy noise --sampling-rate Q --steps T --delta D --target-epsilon E` prints
//!   the smallest noise multiplier meeting the target (last line `noise_multiplier=<number>`).
//!
//! - `dpfl-privacy distributed --mechanism skellam|ddgauss --bits B --clients-per-round N
//!   --dim D --sampling-rate Q --noise-multiplier Z --steps T` prints the two epsilons of
//!   distributed DP (issue 12), labelled: against observers of the released model
//!   (`model_epsilon=`, amplified by sampling) and against the server
//!   (`server_epsilon=`, no amplification, per client over the rounds it takes part in:
//!   `--participations`, by default ceil(Q T)); the last line is `model_epsilon=`.
//!   `--min-clients` is the fewest contributors a round accepts (the noise is accounted at
//!   that count; default N).
//!
//! `--accountant best` (the default) answers with the tightest valid bound, as the
//! server's ledger does: the privacy loss distribution (PLD) almost always, RDP or zCDP
//! where the PLD has no answer or is not tighter. `--accountant rdp` or `pld` answer with
//! that bound alone.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use dpfl_common::dp::accountant::{self, Accountant};
use dpfl_common::dp::distributed::{self, DistributedParams, Mechanism};

#[derive(Parser)]
#[command(
    name = "dpfl-privacy",
    version,
    about = "Privacy calculator for DP federated learning (Poisson-sampled Gaussian mechanism)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which bound answers.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Choice {
    /// The tightest valid bound of RDP, opendp zCDP and PLD (what the server reports).
    Best,
    /// Rényi DP of the subsampled Gaussian alone.
    Rdp,
    /// The privacy loss distribution alone.
    Pld,
}

impl From<Choice> for Accountant {
    fn from(c: Choice) -> Self {
        match c {
            Choice::Best => Accountant::Best,
            Choice::Rdp => Accountant::Rdp,
            Choice::Pld => Accountant::Pld,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Epsilon spent after T rounds.
    #[command(allow_negative_numbers = true)]
    Epsilon {
        /// Poisson sampling rate q of clients per round, in (0, 1].
        #[arg(long)]
        sampling_rate: f64,
        /// Noise multiplier z (noise s.d. / clipping bound).
        #[arg(long)]
        noise_multiplier: f64,
        /// Rounds T.
        #[arg(long)]
        steps: u64,
        /// delta.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Which bound gives `epsilon=`.
        #[arg(long, value_enum, default_value_t = Choice::Best)]
        accountant: Choice,
    },
    /// Smallest noise multiplier that keeps epsilon within a target after T rounds.
    #[command(allow_negative_numbers = true)]
    Noise {
        /// Poisson sampling rate q, in (0, 1].
        #[arg(long)]
        sampling_rate: f64,
        /// Rounds T.
        #[arg(long)]
        steps: u64,
        /// delta.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Target epsilon.
        #[arg(long)]
        target_epsilon: f64,
        /// Which bound must meet the target.
        #[arg(long, value_enum, default_value_t = Choice::Best)]
        accountant: Choice,
    },
    /// Both epsilons of distributed DP (integer noise shares summed by secure aggregation).
    #[command(allow_negative_numbers = true)]
    Distributed {
        /// Integer noise of the shares.
        #[arg(long, value_enum)]
        mechanism: MechanismArg,
        /// Bits per coordinate of the modular sum.
        #[arg(long)]
        bits: u32,
        /// Contributors summed per round (sizes the modular headroom).
        #[arg(long)]
        clients_per_round: usize,
        /// Fewest contributors a round accepts (the noise is accounted there); default N.
        #[arg(long)]
        min_clients: Option<usize>,
        /// Model dimension (padded to a power of two for the rotation).
        #[arg(long)]
        dim: usize,
        /// Poisson sampling rate q of clients per round, in (0, 1].
        #[arg(long)]
        sampling_rate: f64,
        /// Noise multiplier z of the summed noise over the minimum contributors.
        #[arg(long)]
        noise_multiplier: f64,
        /// Rounds T.
        #[arg(long)]
        steps: u64,
        /// Rounds one client takes part in, for the server's view; default ceil(q T).
        #[arg(long)]
        participations: Option<u64>,
        /// L2 clipping bound C.
        #[arg(long, default_value_t = 1.0)]
        clip_norm: f64,
        /// Conditional-rounding beta (default e^-0.5).
        #[arg(long, default_value_t = (-0.5f64).exp())]
        beta: f64,
        /// Standard deviations of the sum kept inside the modular range.
        #[arg(long, default_value_t = 3.0)]
        headroom: f64,
        /// delta.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Clients sampled from (with the default `[secagg]` settings and `--bits`): also
        /// account for whether rounds are released at all, which may depend on one client
        /// (`release_flip_probability`, at the coordinator's own decision edges).
        #[arg(long)]
        population: Option<u64>,
    },
}

/// The noise of distributed DP.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum MechanismArg {
    /// Skellam shares (Agarwal, Kairouz, Liu 2021).
    Skellam,
    /// Distributed discrete Gaussian (Kairouz, Liu, Steinke 2021).
    Ddgauss,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Epsilon {
            sampling_rate,
            noise_multiplier,
            steps,
            delta,
            accountant,
        } => {
            let groups = [(sampling_rate, noise_multiplier, steps)];
            let bounds = accountant::bounds_of_rounds(&groups, delta)?;
            println!("q={sampling_rate} z={noise_multiplier} T={steps} delta={delta:e}");
            println!(
                "rdp (subsampled Gaussian, improved conversion): {:.6}",
                bounds.rdp
            );
            if sampling_rate == 1.0 {
                match bounds.zcdp {
                    Some(zcdp) => println!("zcdp (opendp, no amplification): {zcdp:.6}"),
                    None => println!("zcdp (opendp, no amplification): not computable"),
                }
            }
            match &bounds.pld {
                Ok(pld) => println!("pld (privacy loss distribution, pessimistic): {pld:.6}"),
                Err(e) => {
                    println!("pld (privacy loss distribution, pessimistic): not computable ({e})")
                }
            }
            let (eps, method) = bounds.pick(accountant.into())?;
            match accountant {
                Choice::Best => println!("reported: the tightest bound ({method:?})"),
                _ => println!("reported: {method:?}, as asked"),
            }
            println!("epsilon={eps:.6}");
        }
        Command::Noise {
            sampling_rate,
            steps,
            delta,
            target_epsilon,
            accountant,
        } => {
            let z = accountant::noise_for_epsilon(
                sampling_rate,
                steps,
                delta,
                target_epsilon,
                accountant.into(),
            )?;
            let (eps, method) = accountant::epsilon_of_rounds_with(
                &[(sampling_rate, z, steps)],
                delta,
                accountant.into(),
            )?;
            println!("q={sampling_rate} T={steps} delta={delta:e} target epsilon={target_epsilon}");
            println!("achieved epsilon {eps:.6} ({method:?})");
            println!("noise_multiplier={z}");
        }
        Command::Distributed {
            mechanism,
            bits,
            clients_per_round,
            min_clients,
            dim,
            sampling_rate,
            noise_multiplier,
            steps,
            participations,
            clip_norm,
            beta,
            headroom,
            delta,
            population,
        } => {
            let params = DistributedParams {
                mechanism: match mechanism {
                    MechanismArg::Skellam => Mechanism::Skellam,
                    MechanismArg::Ddgauss => Mechanism::Ddgauss,
                },
                bits,
                clip_norm,
                noise_multiplier,
                min_contributors: min_clients.unwrap_or(clients_per_round),
                max_contributors: clients_per_round,
                dim,
                beta,
                headroom,
            };
            params.validate()?;
            let participations =
                participations.unwrap_or((sampling_rate * steps as f64).ceil() as u64);
            let eps = distributed::epsilons(&params, sampling_rate, steps, participations, delta)?;
            let gauss = distributed::gaussian_generic_epsilon(
                noise_multiplier,
                sampling_rate,
                steps,
                delta,
            )?;
            println!(
                "{} bits={bits} n={clients_per_round} (accounted at {}) d={dim} (padded {}) C={clip_norm} z={noise_multiplier} q={sampling_rate} T={steps} delta={delta:e}",
                params.mechanism,
                params.min_contributors,
                params.padded_dim()
            );
            println!(
                "scale s={:.3}  post-rounding L2 sensitivity {:.6} C",
                params.scale()?,
                params.rounded_l2()? / params.scale()? / clip_norm
            );
            println!("continuous Gaussian, same subsampling bound (reference): {gauss:.6}");
            println!(
                "against the server (no amplification, {participations} rounds taken part in): {:.6}",
                eps.server
            );
            println!(
                "against observers of the released model (amplified by sampling): {:.6}",
                eps.model_observers
            );
            println!("server_epsilon={:.6}", eps.server);
            println!("model_epsilon={:.6}", eps.model_observers);
            if let Some(population) = population {
                let bits8 = u8::try_from(bits)?;
                let cfg = dpfl_server::secure::SecAggConfig {
                    bits: bits8,
                    mechanism: params.mechanism,
                    min_contributors: Some(params.min_contributors),
                    max_contributors: Some(params.max_contributors),
                    ..Default::default()
                };
                let settings = cfg.settings(1, Some(cfg.distributed(params.min_contributors)));
                let edges = dpfl_server::coordinator::release_edges(&settings, &params);
                let per_round =
                    distributed::release_flip_probability(population, sampling_rate, &edges);
                let flip = per_round * steps as f64;
                println!(
                    "release decision: population {population}, it changes at {edges:?} other \
                     participants; depends on one client with probability {per_round:.3e} per \
                     round, {flip:.3e} over {steps} rounds (paid out of delta)"
                );
                match distributed::model_epsilon_with_release_flip(
                    &params,
                    &[(sampling_rate, steps)],
                    delta,
                    flip,
                ) {
                    Ok(e) => {
                        println!(
                            "against observers of the released model, release decision included: {e:.6}"
                        );
                        println!("model_epsilon_with_release_decision={e:.6}");
                    }
                    Err(e) => println!("against observers of the released model: none holds: {e}"),
                }
            }
        }
    }
    Ok(())
}
