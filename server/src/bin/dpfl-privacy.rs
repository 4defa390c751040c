//! `dpfl-privacy`: a planning calculator for people designing a deployment.
//!
//! - `dpfl-privacy epsilon --sampling-rate Q --noise-multiplier Z --steps T --delta D`
//!   prints the epsilon of T rounds of the Poisson-sampled Gaussian mechanism by every
//!   bound (RDP, opendp zCDP when q = 1, PLD), then `epsilon=<number>` (last line).
//! - `dpfl-privacy noise --sampling-rate Q --steps T --delta D --target-epsilon E` prints
//!   the smallest noise multiplier meeting the target (last line `noise_multiplier=<number>`).
//!
//! `--accountant best` (the default) answers with the tightest valid bound, as the
//! server's ledger does: the privacy loss distribution (PLD) almost always, RDP or zCDP
//! where the PLD has no answer or is not tighter. `--accountant rdp` or `pld` answer with
//! that bound alone.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use dpfl_common::dp::accountant::{self, Accountant};

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
    }
    Ok(())
}
