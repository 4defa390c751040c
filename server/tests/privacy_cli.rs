//! The planning calculator prints what the accountant computes, in the promised format.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dpfl-privacy"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn last_line(args: &[&str]) -> String {
    run(args).lines().last().unwrap().to_string()
}

fn number(line: &str, prefix: &str) -> f64 {
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{line:?} lacks {prefix:?}"))
        .parse()
        .unwrap()
}

#[test]
fn epsilon_matches_reference_values() {
    // The default answers with the tightest bound: the PLD, within 1 % of dp_accounting's
    // and never below it.
    let line = last_line(&[
        "epsilon",
        "--sampling-rate",
        "0.1",
        "--noise-multiplier",
        "1.0",
        "--steps",
        "100",
        "--delta",
        "1e-5",
    ]);
    let eps = number(&line, "epsilon=");
    assert!((7.0466..=7.0466 * 1.01).contains(&eps), "{eps}");
    // q = 1: the PLD of one Gaussian round (exactly 4.3772) beats zCDP (4.728) and RDP.
    let line = last_line(&[
        "epsilon",
        "--sampling-rate",
        "1",
        "--noise-multiplier",
        "1",
        "--steps",
        "1",
        "--delta",
        "1e-5",
    ]);
    let eps = number(&line, "epsilon=");
    assert!((eps - 4.3772).abs() < 0.01, "{eps}");
}

#[test]
fn noise_is_the_smallest_multiplier_meeting_the_target() {
    // By the PLD, q = 0.1, z = 2, T = 100 costs 2.3374: that target needs about z = 2.
    let line = last_line(&[
        "noise",
        "--sampling-rate",
        "0.1",
        "--steps",
        "100",
        "--delta",
        "1e-5",
        "--target-epsilon",
        "2.3374",
    ]);
    let z = number(&line, "noise_multiplier=");
    assert!((z - 2.0).abs() < 0.01, "{z}");
    let check = last_line(&[
        "epsilon",
        "--sampling-rate",
        "0.1",
        "--noise-multiplier",
        &z.to_string(),
        "--steps",
        "100",
    ]);
    let eps = number(&check, "epsilon=");
    assert!(eps <= 2.3374, "{eps}");
}

#[test]
fn bad_input_fails_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_dpfl-privacy"))
        .args([
            "epsilon",
            "--sampling-rate",
            "2",
            "--noise-multiplier",
            "1",
            "--steps",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sampling rate"));
}

#[test]
fn negative_and_zero_sampling_rates_are_refused_as_values() {
    // Audit: `--sampling-rate -0.1` was parsed as a flag, and q = 0 was accepted.
    for q in ["-0.1", "0"] {
        let out = Command::new(env!("CARGO_BIN_EXE_dpfl-privacy"))
            .args([
                "epsilon",
                "--sampling-rate",
                q,
                "--noise-multiplier",
                "1",
                "--steps",
                "10",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "q = {q} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("sampling rate must be in (0, 1]"),
            "q = {q}: {err}"
        );
    }
}

#[test]
fn huge_step_counts_are_answered_without_a_huge_allocation() {
    // Audit: T = 1e8 allocated 1.5 GB; T = u64::MAX panicked.
    let out = Command::new(env!("CARGO_BIN_EXE_dpfl-privacy"))
        .args([
            "epsilon",
            "--sampling-rate",
            "1",
            "--noise-multiplier",
            "1000",
            "--steps",
            "100000000",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_dpfl-privacy"))
        .args([
            "epsilon",
            "--sampling-rate",
            "0.01",
            "--noise-multiplier",
            "1",
            "--steps",
            &u64::MAX.to_string(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
