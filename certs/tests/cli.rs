//! The `dpfl-certs` binary: kits, one flag vocabulary across subcommands, negative numbers
//! read as values, `show` describing server, node and CA certificates.

use std::process::{Command, Output};

fn certs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dpfl-certs"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn subcommands_share_flags_accept_negative_values_and_show_describes_every_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let fed = tmp.path().join("fed");
    let f = |p: &str| fed.join(p).display().to_string();
    let o = certs(&[
        "init",
        "--out",
        &f(""),
        "--san",
        "fl.example.org",
        "--nodes",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("keep this folder apart"), "{}", text(&o));
    // A negative value is a value, refused for what it is.
    let o = certs(&[
        "init",
        "--out",
        &tmp.path().join("x").display().to_string(),
        "--days",
        "-5",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--days must be between 1 and 36500, got -5"),
        "{}",
        text(&o)
    );
    assert!(
        !tmp.path().join("x").exists(),
        "nothing written for a refused command"
    );
    // --ca, --out, --days, --force and --san mean the same everywhere.
    let o = certs(&["node", "--ca", &f("ca"), "--name", "extra", "--days", "30"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(fed.join("extra").join("extra.pem").exists());
    let o = certs(&[
        "server",
        "--ca",
        &f("ca"),
        "--san",
        "fl2.example.org",
        "--force",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let node_dir = tmp.path().join("node");
    let o = certs(&[
        "request",
        "--name",
        "hospital-a",
        "--out",
        &node_dir.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let csr = node_dir.join("hospital-a.csr").display().to_string();
    let back = tmp.path().join("back").display().to_string();
    let o = certs(&[
        "sign",
        "--ca",
        &f("ca"),
        "--csr",
        &csr,
        "--out",
        &back,
        "--days",
        "90",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let signed = tmp.path().join("back").join("hospital-a.pem");
    let o = certs(&[
        "renew",
        "--ca",
        &f("ca"),
        "--cert",
        &signed.display().to_string(),
    ]);
    assert!(
        o.status.success() && text(&o).contains("same key"),
        "{}",
        text(&o)
    );
    // show: server, node and CA, each described as what it is, with its expiry.
    let o = certs(&[
        "show",
        &f("server/server.pem"),
        &f("node-1/node-1.pem"),
        &f("ca/ca.pem"),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("server certificate for fl2.example.org, expires "),
        "{t}"
    );
    assert!(t.contains("node node-1, expires "), "{t}");
    assert!(t.contains("federation CA, expires "), "{t}");
    assert!(!t.contains("unusable node name"), "{t}");
    assert!(
        t.contains("(in 365 days)") || t.contains("(in 364 days)"),
        "{t}"
    );
    let help = text(&certs(&["--help"]));
    assert!(help.contains("Examples:"), "{help}");
}
