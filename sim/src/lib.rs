//! dpfl-sim: privacy simulations with many virtual clients on one machine.
//!
//! An experiment file ([`experiment`]) expands into configurations; each runs the **same**
//! coordinator, strategies, DP wrappers and client update pipeline as the real server and
//! nodes ([`run`]), through an in-memory transport or over real QUIC/mTLS ([`quic`]), and
//! the results are written as JSON lines, a summary CSV and plots ([`report`]).
//!
//! There is no second implementation of FedAvg or DP here: the simulator only replaces the
//! sockets.

pub mod experiment;
pub mod prep;
pub mod quic;
pub mod report;
pub mod run;
mod secure;

use std::path::{Path, PathBuf};

/// Runs every configuration of an experiment and writes the results into
/// `out/<experiment name>/`. `progress(total_rounds_done, total_rounds, label)`.
pub fn run_experiment(
    configs: Vec<experiment::Configuration>,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<(PathBuf, Vec<report::Finished>), Box<dyn std::error::Error>> {
    let name = configs
        .first()
        .map_or("experiment".to_string(), |c| c.config.name.clone());
    let dir = out.join(&name);
    std::fs::create_dir_all(&dir)?;
    let total: u64 = configs.iter().map(|c| c.config.rounds).sum();
    let mut done_before = 0u64;
    let mut finished = Vec::new();
    for c in configs {
        let label = format!("{} {}", c.id, c.label);
        let (result, prep) =
            run::run_with_prep(&c.config, &mut |r| progress(done_before + r, total, &label))
                .map_err(|e| format!("{}: {e}", c.id))?;
        // The final model with what inference needs (`dpfl-predict`): the transform and
        // the names of the table.
        let model = dpfl_ml::predict::ModelFile {
            spec: c.config.model.spec()?,
            params: result.final_params.clone(),
            standardizer: prep.standardizer.clone(),
            class_names: prep.class_names.clone(),
            feature_names: prep.feature_names.clone(),
        };
        if !model.params.is_empty() {
            model.save(&dir.join(format!("{}.model.safetensors", c.id)))?;
        }
        if let Some(eps) = prep.epsilon {
            std::fs::write(
                dir.join(format!("{}.standardize.json", c.id)),
                format!(
                    "{{\"epsilon\": {eps}, \"delta\": {}, \"noise_multiplier\": {}, \"unit\": \"row\"}}\n",
                    c.config.dp.delta, c.config.standardize.noise_multiplier
                ),
            )?;
        }
        done_before += c.config.rounds;
        let f = report::Finished {
            config: c,
            result,
            peak_rss_mib: report::peak_rss_mib(),
        };
        report::write_rounds(&dir, &f)?;
        finished.push(f);
        // Rewrite the summary after every configuration so a long sweep can be inspected.
        report::write_summary(&dir, &finished)?;
    }
    report::write_plots(&dir, &name, &finished)?;
    Ok((dir, finished))
}
