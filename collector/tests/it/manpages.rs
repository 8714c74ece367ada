//! The man pages and shell completions the packages install (scripts/package.sh runs the
//! same hidden commands): generated from the clap definitions, one page per command, the
//! main page carrying the packaged configuration as its reference.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(bin: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The subcommands `--help` lists (without `help`).
fn commands(bin: &Path, path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let (_, help, _) = run(bin, &args);
    help.split("Commands:\n")
        .nth(1)
        .map(|rest| {
            rest.lines()
                .take_while(|l| l.starts_with("  "))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|c| *c != "help")
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `man -l` as a reader sees it: plain text, and whatever man complained about.
fn render(page: &Path) -> (String, String) {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANWIDTH", "200")
        .env("MAN_KEEP_FORMATTING", "0")
        .env("MANPAGER", "cat")
        .output()
        .expect("man is missing (apt-get install man-db)");
    let text = String::from_utf8_lossy(&out.stdout);
    // Strip overstrike (bold/underline) as col -b does.
    let mut plain = String::new();
    for c in text.chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    (plain, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn man_pages_have_every_command_and_the_packaged_configuration() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, name, config) in [
        (agent_bin(), "edgeprobe-agent", "agent.toml"),
        (collector_bin(), "edgeprobe-collector", "collector.toml"),
    ] {
        let out = dir.path().join(name);
        let (ok, stdout, stderr) = run(&bin, &["manpage", "--out", out.to_str().unwrap()]);
        assert!(ok, "{name} manpage: {stdout}{stderr}");
        let (page, warnings) = render(&out.join(format!("{name}.1")));
        assert!(warnings.trim().is_empty(), "{name}.1: {warnings}");
        for section in [
            "SYNOPSIS",
            "OPTIONS",
            "CONFIGURATION",
            "FILES",
            "EXIT STATUS",
        ] {
            assert!(
                page.lines().any(|l| l == section),
                "{name}.1 lacks {section}"
            );
        }
        // The configuration reference is the packaged file, every line of it.
        let packaged = std::fs::read_to_string(repo().join("packaging/etc").join(config)).unwrap();
        for line in packaged.lines().map(str::trim).filter(|l| !l.is_empty()) {
            assert!(
                page.contains(line),
                "{name}.1 lacks the configuration line {line:?}"
            );
        }
        // One page per command, with its options and their help.
        let top = commands(&bin, &[]);
        assert!(top.len() >= 4, "{name}: {top:?}");
        for sub in &top {
            let file = out.join(format!("{name}-{sub}.1"));
            assert!(file.exists(), "no page {}", file.display());
            let (text, warnings) = render(&file);
            assert!(warnings.trim().is_empty(), "{}: {warnings}", file.display());
            assert!(
                page.contains(&format!("{name}-{sub}(1)")),
                "{name}.1 does not refer to {name}-{sub}(1)"
            );
            assert!(text.contains("OPTIONS"), "{}: no OPTIONS", file.display());
            for nested in commands(&bin, &[sub]) {
                assert!(
                    out.join(format!("{name}-{sub}-{nested}.1")).exists(),
                    "no page for {name} {sub} {nested}"
                );
            }
        }
        // The packaging commands stay out of --help and out of the pages.
        let (_, help, _) = run(&bin, &["--help"]);
        for hidden in ["manpage", "completions"] {
            assert!(!help.contains(hidden), "{name} --help shows {hidden}");
            assert!(!out.join(format!("{name}-{hidden}.1")).exists());
        }
    }
}

#[test]
fn shell_completions_cover_every_command() {
    for (bin, name) in [
        (agent_bin(), "edgeprobe-agent"),
        (collector_bin(), "edgeprobe-collector"),
    ] {
        let top = commands(&bin, &[]);
        for shell in ["bash", "zsh", "fish"] {
            let (ok, script, stderr) = run(&bin, &["completions", shell]);
            assert!(ok, "{name} completions {shell}: {stderr}");
            for sub in &top {
                assert!(script.contains(sub.as_str()), "{name} {shell}: no {sub}");
            }
        }
        // bash loads it and registers the completion function for the command.
        let (_, script, _) = run(&bin, &["completions", "bash"]);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), script).unwrap();
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {} && complete -p {name}",
                file.path().display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(name),
            "bash: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ok, _, stderr) = run(&bin, &["completions", "tcsh-not"]);
        // An unknown shell is refused with the ones there are.
        assert!(
            !ok && ["bash", "zsh", "fish"].iter().all(|s| stderr.contains(s)),
            "{stderr}"
        );
    }
}
