//! The Debian package (`cargo deb`): its files and modes, control fields and maintainer
//! scripts; under CI=true (as root, on a scratch machine) also installed, checked and purged.
//! Without cargo-deb the package tests skip with a reason, except under CI=true, where they
//! fail: CI installs it (.ci/run). Also `--version`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

#[test]
fn version_prints_name_and_cargo_version() {
    for flag in ["--version", "-V"] {
        let out = run(env!("CARGO_BIN_EXE_heloguard"), &[flag]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("heloguard {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
    let help = run(env!("CARGO_BIN_EXE_heloguard"), &["--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "--version",
        "whatif --policy",
        "validates the whole configuration",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

/// Builds the package; `None` (a skip) when cargo-deb is missing outside CI.
fn build_package() -> Option<PathBuf> {
    let cargo = env!("CARGO");
    let has_deb = Command::new(cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_deb {
        assert!(!in_ci(), "cargo-deb is required under CI=true");
        println!("skipped: cargo-deb is not installed (cargo install cargo-deb --locked)");
        return None;
    }
    let out = Command::new(cargo)
        .args(["deb", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo deb");
    assert!(out.status.success(), "cargo deb failed:\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("cargo deb named no .deb:\n{}", text(&out)));
    let deb = Path::new(env!("CARGO_MANIFEST_DIR")).join(deb);
    assert!(deb.is_file(), "{}", deb.display());
    Some(deb)
}

#[test]
fn the_package_holds_the_files_scripts_and_fields() {
    let Some(deb) = build_package() else {
        return;
    };
    let deb_path = deb.to_str().expect("utf-8 path");

    let contents = text(&run("dpkg-deb", &["-c", deb_path]));
    // `dpkg-deb -c` lines: MODE OWNER/GROUP SIZE DATE TIME PATH.
    let entry = |path: &str| -> Option<(String, String)> {
        contents.lines().find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() >= 6 && fields[5] == path)
                .then(|| (fields[0].to_string(), fields[1].to_string()))
        })
    };
    for (path, mode) in [
        ("./usr/sbin/heloguard", "-rwxr-xr-x"),
        ("./etc/heloguard/heloguard.env", "-rw-r-----"),
        ("./usr/share/doc/heloguard/README.md", "-rw-r--r--"),
        ("./usr/share/doc/heloguard/LICENSE-MIT", "-rw-r--r--"),
        ("./usr/share/doc/heloguard/LICENSE-APACHE", "-rw-r--r--"),
        ("./usr/share/doc/heloguard/copyright", "-rw-r--r--"),
        (
            "./usr/share/doc/heloguard/contrib/prometheus/heloguard-alerts.yml",
            "-rw-r--r--",
        ),
    ] {
        let (got, owner) = entry(path).unwrap_or_else(|| panic!("{path} missing:\n{contents}"));
        assert_eq!(got, mode, "{path}");
        // dpkg-deb shows the owner by name or, for cargo-deb's archives, by number.
        assert!(
            matches!(owner.as_str(), "root/root" | "0/0"),
            "{path}: {owner}"
        );
    }
    let unit = [
        "./lib/systemd/system/heloguard.service",
        "./usr/lib/systemd/system/heloguard.service",
    ]
    .into_iter()
    .find_map(entry)
    .unwrap_or_else(|| panic!("no systemd unit:\n{contents}"));
    assert_eq!(unit.0, "-rw-r--r--");

    let info = text(&run("dpkg-deb", &["-I", deb_path]));
    for needle in [
        "Package: heloguard",
        &format!("Version: {}", env!("CARGO_PKG_VERSION")),
        "Section: mail",
        "Description: Inbound SMTP server that judges the HELO/EHLO identity against DNS",
    ] {
        assert!(info.contains(needle), "{needle}:\n{info}");
    }
    let depends = info
        .lines()
        .find(|l| l.trim_start().starts_with("Depends:"))
        .unwrap_or_else(|| panic!("no Depends:\n{info}"));
    assert!(
        depends.contains("adduser") && depends.contains("libc6"),
        "{depends}"
    );

    let control = std::env::temp_dir().join(format!("heloguard-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&control);
    let out = run(
        "dpkg-deb",
        &["-e", deb_path, control.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{}", text(&out));
    let read = |name: &str| std::fs::read_to_string(control.join(name)).unwrap_or_default();
    let postinst = read("postinst");
    for needle in [
        "adduser --system",
        "/var/spool/heloguard",
        "0770",
        "deb-systemd-helper",
    ] {
        assert!(
            postinst.contains(needle),
            "postinst lacks {needle}:\n{postinst}"
        );
    }
    assert!(!postinst.contains("#DEBHELPER#"), "unexpanded token");
    let postrm = read("postrm");
    for needle in [
        "purge",
        "deluser",
        "rm -rf /var/spool/heloguard /var/lib/heloguard",
    ] {
        assert!(postrm.contains(needle), "postrm lacks {needle}:\n{postrm}");
    }
    assert!(
        read("conffiles")
            .lines()
            .any(|l| l == "/etc/heloguard/heloguard.env")
    );
    let _ = std::fs::remove_dir_all(&control);

    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if in_ci() && root {
        install_check_and_purge(deb_path);
    } else {
        println!("not installed: dpkg -i runs only as root under CI=true (it changes the system)");
    }
}

/// dpkg -i, the user, directories and binary, then dpkg --purge; CI machines only.
fn install_check_and_purge(deb: &str) {
    let out = run("dpkg", &["-i", deb]);
    assert!(out.status.success(), "dpkg -i:\n{}", text(&out));
    let user = run("getent", &["passwd", "heloguard"]);
    assert!(user.status.success(), "no user heloguard");
    let spool = run("stat", &["-c", "%a %U:%G", "/var/spool/heloguard"]);
    assert_eq!(
        String::from_utf8_lossy(&spool.stdout).trim(),
        "770 heloguard:heloguard"
    );
    let state = run("stat", &["-c", "%U:%G", "/var/lib/heloguard"]);
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "heloguard:heloguard"
    );
    let env = run("stat", &["-c", "%a", "/etc/heloguard/heloguard.env"]);
    assert_eq!(String::from_utf8_lossy(&env.stdout).trim(), "640");
    let version = run("/usr/sbin/heloguard", &["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("heloguard {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = run("dpkg", &["--purge", "heloguard"]);
    assert!(out.status.success(), "dpkg --purge:\n{}", text(&out));
    assert!(!run("getent", &["passwd", "heloguard"]).status.success());
    assert!(!Path::new("/var/spool/heloguard").exists());
    assert!(!Path::new("/usr/sbin/heloguard").exists());
}

/// The sandbox stays at least as tight as it was with DynamicUser= (exposure 2.0).
#[test]
fn the_unit_exposure_stays_low() {
    let supported = Command::new("systemd-analyze")
        .args(["security", "--help"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--offline")
        });
    if !supported {
        println!("skipped: systemd-analyze security --offline is not available");
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/heloguard.service"),
    )
    .expect("read the unit");
    let dir = std::env::temp_dir().join(format!("heloguard-exposure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("heloguard.service");
    std::fs::write(&path, unit).expect("write the unit copy");
    let out = run(
        "systemd-analyze",
        &["security", "--offline=true", path.to_str().expect("utf-8")],
    );
    let _ = std::fs::remove_dir_all(&dir);
    let report = text(&out);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for heloguard.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level:\n{report}"));
    assert!(level <= 2.0, "exposure {level}:\n{report}");
}
