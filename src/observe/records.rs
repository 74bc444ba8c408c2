//! The record options of `netfence run` (`--pcap`, `--audit` and their bounds) and the writers
//! they start: both files are created at start-up, so a path that cannot be written is an
//! argument error (exit 2) before any VMM connects, never a surprise at run time.

use std::path::PathBuf;
use std::sync::Arc;

use super::audit::AuditLog;
use super::pcap::PcapLog;
use super::writer::{FileSpec, MAX_KEEP};
use crate::limits::Limits;

/// Largest `--pcap-max-mb` / `--audit-max-mb`.
pub const MAX_MB: u64 = 1_000_000;
/// What one "MB" of those options is.
pub const MB: u64 = 1024 * 1024;

fn parse_mb(s: &str) -> Result<u64, String> {
    let accepted = format!("expected 1-{MAX_MB} (MiB)");
    match s.parse::<u64>() {
        Ok(n) if (1..=MAX_MB).contains(&n) => Ok(n),
        Ok(_) => Err(format!("out of range; {accepted}")),
        Err(_) => Err(format!("not a number; {accepted}")),
    }
}

fn parse_keep(s: &str) -> Result<u32, String> {
    let accepted = format!("expected 0-{MAX_KEEP} (old files kept)");
    match s.parse::<u32>() {
        Ok(n) if n <= MAX_KEEP => Ok(n),
        Ok(_) => Err(format!("out of range; {accepted}")),
        Err(_) => Err(format!("not a number; {accepted}")),
    }
}

/// `--pcap` and `--audit` with their bounds. Flatten into `run` with `#[command(flatten)]`.
#[derive(clap::Args, Debug, Clone)]
pub struct RecordArgs {
    /// Record every frame between the guest and netfence in FILE, as pcap (Ethernet; read it
    /// with `tcpdump -r FILE` or Wireshark): frames the guest sent, as netfence took them from
    /// its TX queues, and frames written into its RX buffers, of every queue pair. Frames are
    /// recorded as they are (with offloads up to 64 KiB, checksums maybe partial). Writing
    /// never stalls the guest: frames that find the writer's queue full (limit
    /// pcap-queue-bytes) are dropped from the file and counted (`pcap-queue-full` in the
    /// link's closing line). Created 0600; an existing FILE is rotated away, not overwritten.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    /// Rotate the pcap file before it passes N MiB: FILE becomes FILE.1 (FILE.1 becomes FILE.2,
    /// ...) and a new FILE starts; each file is a whole pcap. 1-1000000.
    #[arg(long = "pcap-max-mb", value_name = "N", default_value_t = 100, value_parser = parse_mb, requires = "pcap")]
    pub pcap_max_mb: u64,
    /// Old pcap files kept at rotation (FILE.1 to FILE.N; 0: none), so the disk used is at most
    /// (N + 1) x --pcap-max-mb. 0-100.
    #[arg(long = "pcap-files", value_name = "N", default_value_t = 2, value_parser = parse_keep, requires = "pcap")]
    pub pcap_files: u32,
    /// Write one JSON line per flow decision (time, link, pair, direction, protocol, src, dst,
    /// domains and their source, action, rule, reason), per flow at its end (bytes each way,
    /// duration) and per secret violation (the secret's name and the host, never its value)
    /// to FILE. Denied decisions are written at most audit-deny-rate a second per queue pair
    /// (the rest counted in a `decisions-suppressed` line); lines that find the writer's queue
    /// full (audit-queue-bytes) are dropped and counted in the log. Created 0600; an existing
    /// FILE is rotated away, not overwritten.
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// Rotate the audit file before it passes N MiB (as --pcap-max-mb). 1-1000000.
    #[arg(long = "audit-max-mb", value_name = "N", default_value_t = 100, value_parser = parse_mb, requires = "audit")]
    pub audit_max_mb: u64,
    /// Old audit files kept at rotation (FILE.1 to FILE.N; 0: none). 0-100.
    #[arg(long = "audit-files", value_name = "N", default_value_t = 2, value_parser = parse_keep, requires = "audit")]
    pub audit_files: u32,
}

/// The writers `--pcap` and `--audit` started; dropping it writes what is queued and closes
/// the files.
#[derive(Default)]
pub struct Records {
    pub pcap: Option<Arc<PcapLog>>,
    pub audit: Option<Arc<AuditLog>>,
}

impl Records {
    /// Creates the files and starts their writers. The error names the option, the path and
    /// why (an argument error: exit 2).
    pub fn open(args: &RecordArgs, limits: &Limits) -> Result<Records, String> {
        if let (Some(p), Some(a)) = (&args.pcap, &args.audit) {
            if p == a {
                return Err(format!(
                    "--pcap and --audit are both {}: they need two files",
                    p.display()
                ));
            }
        }
        let mut records = Records::default();
        if let Some(path) = &args.pcap {
            let spec = FileSpec {
                path: path.clone(),
                max_bytes: args.pcap_max_mb * MB,
                keep: args.pcap_files,
            };
            let log = PcapLog::create(spec, limits.pcap_queue_bytes).map_err(|e| {
                format!(
                    "--pcap {}: cannot create the file: {e} (does the directory exist and is it writable?)",
                    path.display()
                )
            })?;
            records.pcap = Some(Arc::new(log));
        }
        if let Some(path) = &args.audit {
            let spec = FileSpec {
                path: path.clone(),
                max_bytes: args.audit_max_mb * MB,
                keep: args.audit_files,
            };
            let log = AuditLog::create(spec, limits.audit_queue_bytes).map_err(|e| {
                format!(
                    "--audit {}: cannot create the file: {e} (does the directory exist and is it writable?)",
                    path.display()
                )
            })?;
            records.audit = Some(Arc::new(log));
        }
        Ok(records)
    }

    /// Writes what is queued and closes the files (also done on drop).
    pub fn finish(&self) {
        if let Some(p) = &self.pcap {
            p.finish();
        }
        if let Some(a) = &self.audit {
            a.finish();
        }
    }
}

impl Drop for Records {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_are_checked() {
        assert_eq!(parse_mb("1"), Ok(1));
        assert!(parse_mb("0").unwrap_err().contains("1-1000000"));
        assert!(parse_mb("x").unwrap_err().contains("not a number"));
        assert_eq!(parse_keep("0"), Ok(0));
        assert!(parse_keep("101").unwrap_err().contains("0-100"));
    }
}
