//! The operations files: Prometheus alert rules (checked and unit-tested by
//! promtool) and the systemd unit (verified, and rated by systemd's own
//! security analysis).

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(program: &str, args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed (.ci/run installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = Path::new(ROOT).join("ops/prometheus");
    let (ok, said) = run("promtool", &["check", "rules", "alerts.yml"], &dir);
    assert!(ok, "{said}");
    assert!(said.contains("8 rules found"), "{said}");
    let (ok, said) = run("promtool", &["test", "rules", "alerts_test.yml"], &dir);
    assert!(ok, "{said}");
}

#[test]
fn the_config_shipped_for_the_unit_loads_and_matches_its_paths() {
    let config = mailnode::config::load(&Path::new(ROOT).join("ops/systemd/mailnode.toml"))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let unit =
        std::fs::read_to_string(Path::new(ROOT).join("ops/systemd/mailnode.service")).unwrap();
    assert!(
        unit.contains("StateDirectory=mailnode")
            && config.spool.path.starts_with("/var/lib/mailnode")
    );
    assert!(
        unit.contains("RuntimeDirectory=mailnode")
            && config.control.socket.starts_with("/run/mailnode")
    );
    assert!(unit.contains("-c /etc/mailnode/mailnode.toml"));
}

#[test]
fn the_systemd_unit_verifies_and_rates_ok() {
    // verify checks that ExecStart exists: point it at the binary we built.
    let unit =
        std::fs::read_to_string(Path::new(ROOT).join("ops/systemd/mailnode.service")).unwrap();
    let unit = unit.replace("/usr/sbin/mailnode", env!("CARGO_BIN_EXE_mailnode"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailnode.service");
    std::fs::write(&path, unit).unwrap();
    let path = path.to_str().unwrap();
    let (ok, said) = run("systemd-analyze", &["verify", path], dir.path());
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // The socket unit, beside the service it activates.
    let socket = dir.path().join("mailnode.socket");
    std::fs::copy(
        Path::new(ROOT).join("ops/systemd/socket/mailnode.socket"),
        &socket,
    )
    .unwrap();
    let (ok, said) = run(
        "systemd-analyze",
        &["verify", socket.to_str().unwrap()],
        dir.path(),
    );
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify socket: {said}"
    );
    let (_, said) = run(
        "systemd-analyze",
        &["security", "--offline=true", path],
        dir.path(),
    );
    let level: f64 = said
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for mailnode.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {said}"));
    assert!(level <= 2.0, "exposure {level} > 2.0:\n{said}");
}

#[test]
fn the_haproxy_config_for_a_fleet_is_valid() {
    let dir = Path::new(ROOT).join("ops/haproxy");
    let (ok, said) = run("haproxy", &["-c", "-f", "haproxy.cfg"], &dir);
    assert!(ok, "{said}");
}
