//! `netfence secrets env`: the `ENV_VAR=placeholder` lines a launcher puts into the guest's
//! environment, one per secret, shell-quoted. It reads no value (neither `value_env` nor
//! `value_file`): a launcher needs the placeholders only.

use crate::config::cli::NetworkArgs;
use crate::config::NetworkConfig;

/// Print `ENV_VAR=placeholder` for each secret (shell-quoted), for the guest's environment.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EnvArgs {
    #[command(flatten)]
    pub net: NetworkArgs,
}

/// Runs `secrets env`: 0 with the lines on stdout, or 2 for a bad config or arguments.
pub fn run_env(a: &EnvArgs) -> i32 {
    match a.net.resolve() {
        Ok(cfg) => {
            print!("{}", env_lines(&cfg));
            0
        }
        Err(e) => {
            eprintln!("netfence: {e}");
            e.exit_code()
        }
    }
}

/// One `NAME=placeholder` line per secret, in config order.
pub fn env_lines(cfg: &NetworkConfig) -> String {
    cfg.secrets
        .iter()
        .map(|s| {
            format!(
                "{}={}\n",
                shell_quote(&s.env_var),
                shell_quote(&s.effective_placeholder())
            )
        })
        .collect()
}

/// `s` as one POSIX shell word: as it is when it holds only characters no shell changes,
/// else in single quotes (a `'` inside written `'\''`).
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'-' | b'.' | b'/' | b',' | b':' | b'@' | b'%' | b'+'
                )
        });
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
