//! The man pages and shell completions, generated from the clap definitions (one source:
//! what `--help` says) plus the configuration reference, taken verbatim from the commented
//! packaged configuration (packaging/etc/), and the files, exit status and see-also
//! sections of packaging/man/. scripts/package.sh runs the hidden `manpage` and
//! `completions` commands to build what the .deb and .rpm install.

use std::io::Write;
use std::path::Path;

/// Writes `BIN.1` (the command, its options, every subcommand, the configuration reference
/// and `extra`, roff) and `BIN-SUB.1` for each subcommand into `dir`.
pub fn write_man_pages(
    cmd: clap::Command,
    config_name: &str,
    config: &str,
    extra: &str,
    dir: &Path,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cmd = cmd.disable_help_subcommand(true);
    let bin = cmd.get_name().to_string();
    // The subcommands' pages (clap_mangen names them BIN-SUB.1), then the main page over
    // the one generate_to wrote, with the configuration reference and the extra sections.
    clap_mangen::generate_to(cmd.clone(), dir)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    writeln!(page, ".SH CONFIGURATION")?;
    writeln!(
        page,
        "The packaged {} as installed, with its comments: every key and its \
         default. Commented-out keys show the default or an example.",
        roff_text(config_name)
    )?;
    for (heading, body) in config_sections(config) {
        if let Some(h) = heading {
            writeln!(page, ".SS {}", roff_text(&h))?;
        }
        writeln!(page, ".PP\n.nf\n.RS 4")?;
        for line in body.lines() {
            writeln!(page, "{}", roff_line(line))?;
        }
        writeln!(page, ".RE\n.fi")?;
    }
    page.extend_from_slice(extra.as_bytes());
    std::fs::write(dir.join(format!("{bin}.1")), page)
}

/// Writes the completion script for `shell` to stdout.
pub fn write_completions(cmd: clap::Command, shell: clap_complete::Shell) -> std::io::Result<()> {
    let mut cmd = cmd;
    let bin = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, bin, &mut script);
    std::io::stdout().write_all(&script)
}

/// The configuration split at its `[table]` / `[[array]]` headers: the lines before the
/// first header (no heading), then each header with the lines up to the next one. A
/// commented-out header (`# [[test]]`) stays in its section's text.
fn config_sections(config: &str) -> Vec<(Option<String>, String)> {
    let mut out: Vec<(Option<String>, String)> = vec![(None, String::new())];
    for line in config.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            out.push((Some(t.to_string()), String::new()));
            continue;
        }
        if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out.retain(|(h, body)| h.is_some() || !body.trim().is_empty());
    out
}

/// Text safe in a roff line: backslashes escaped, dashes as minus signs.
fn roff_text(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

/// A line of preformatted text: escaped, and guarded when it starts with a control
/// character (`.` or `'`).
fn roff_line(s: &str) -> String {
    let t = roff_text(s);
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// The hidden packaging commands, kept out of `Command` and `--help` (scripts/package.sh
/// only): `manpage --out DIR` and `completions SHELL`. `None` for every other command line.
pub fn packaging_command(cli: clap::Command) -> Option<std::process::ExitCode> {
    use std::process::ExitCode;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["manpage", "--out", dir] => Some(
            match write_man_pages(
                cli,
                "/etc/edgeprobe/collector.toml",
                include_str!("../../packaging/etc/collector.toml"),
                include_str!("../../packaging/man/edgeprobe-collector.roff"),
                Path::new(dir),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("manpage: cannot write the man pages to {dir}: {e}");
                    ExitCode::FAILURE
                }
            },
        ),
        ["completions", shell] => Some(match shell.parse::<clap_complete::Shell>() {
            Ok(shell) => match write_completions(cli, shell) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("completions: cannot write the script: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("completions: {e} (bash, zsh, fish, elvish, powershell)");
                ExitCode::from(2)
            }
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_sections_split_at_headers_and_keep_commented_headers() {
        let s = config_sections("# top\n\n[a]\nx = 1\n# [[b]]\n[[c]]\ny = 2\n");
        assert_eq!(
            s,
            vec![
                (None, "# top\n\n".to_string()),
                (Some("[a]".into()), "x = 1\n# [[b]]\n".to_string()),
                (Some("[[c]]".into()), "y = 2\n".to_string()),
            ]
        );
    }

    #[test]
    fn roff_lines_are_escaped() {
        assert_eq!(roff_line(".x \\ -y"), "\\&.x \\e \\-y");
        assert_eq!(roff_line("'q"), "\\&'q");
    }
}
