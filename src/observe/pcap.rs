//! `--pcap FILE`: every frame between the guest and netfence, in the classic pcap format that
//! tcpdump and Wireshark read.
//!
//! What is recorded: each Ethernet frame the link takes from a TX queue (as the guest sent it,
//! before any check, so dropped and spoofed frames are in the file too) and each frame written
//! into the guest's RX buffers, with the time it was taken or delivered. Frames are recorded
//! as they are: with offloads a frame may be one TCP segment of up to 64 KiB, and its L4
//! checksum may be partial (the virtio-net header that says so is not recorded), which
//! `tcpdump -v` reports as a bad checksum. All queue pairs (`--queues`) and successive VMM
//! connections feed one file.
//!
//! The format (the "libpcap" file format, also described in the IETF draft
//! draft-ietf-opsawg-pcap): a 24-byte global header (magic 0xa1b2c3d4, version 2.4, time zone
//! and accuracy 0, snap length, link type 1 = Ethernet), then per frame a 16-byte record header
//! (seconds and microseconds since the epoch, captured length, original length) and the frame's
//! bytes. Every field is written little-endian; the magic tells readers the byte order. Each
//! rotated file is a complete pcap with its own global header.
//!
//! Cost on the datapath: with `--pcap` off, one `Option` check per frame. With it on, a
//! reservation in the writer's bytes-bounded queue (`pcap-queue-bytes`), one allocation and a
//! copy of the frame; when the queue is full nothing is copied and the frame is counted as
//! dropped (the link's `pcap-queue-full`, and the writer's log).

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use super::writer::{FileSpec, RecordWriter, RotatingFile, WriterStats};

/// Frames are recorded whole up to this length (libpcap's own largest snap length for
/// Ethernet). A 64 KiB TSO segment with its Ethernet header is 65,549 bytes, more than the
/// traditional 65,535.
pub const SNAPLEN: u32 = 262_144;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// The magic number of microsecond-resolution pcap files.
pub const MAGIC: u32 = 0xa1b2_c3d4;
pub const GLOBAL_HEADER_LEN: usize = 24;
pub const RECORD_HEADER_LEN: usize = 16;

/// The file's global header.
pub fn global_header() -> [u8; GLOBAL_HEADER_LEN] {
    let mut h = [0u8; GLOBAL_HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone (8..12) and sigfigs (12..16) stay 0.
    h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// One frame's record header.
pub fn record_header(
    secs: u32,
    micros: u32,
    captured: u32,
    original: u32,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&secs.to_le_bytes());
    h[4..8].copy_from_slice(&micros.to_le_bytes());
    h[8..12].copy_from_slice(&captured.to_le_bytes());
    h[12..16].copy_from_slice(&original.to_le_bytes());
    h
}

/// The pcap file and its writer thread, shared by every link of the process.
pub struct PcapLog {
    writer: RecordWriter,
}

impl PcapLog {
    /// Creates the file (an existing one is rotated away) and starts its writer, with at most
    /// `queue_bytes` of frames waiting for it.
    pub fn create(spec: FileSpec, queue_bytes: usize) -> io::Result<PcapLog> {
        let file = RotatingFile::create(spec, global_header().to_vec())?;
        Ok(PcapLog {
            writer: RecordWriter::start("pcap", "pcap-queue-bytes", queue_bytes, file)?,
        })
    }

    /// Records one frame, now. False when the writer's queue had no room (the frame is not
    /// recorded; the caller counts it).
    #[inline]
    pub fn record(&self, frame: &[u8]) -> bool {
        let captured = frame.len().min(SNAPLEN as usize);
        let len = RECORD_HEADER_LEN + captured;
        if !self.writer.reserve(len) {
            return false;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut record = Vec::with_capacity(len);
        record.extend_from_slice(&record_header(
            now.as_secs() as u32,
            now.subsec_micros(),
            captured as u32,
            u32::try_from(frame.len()).unwrap_or(u32::MAX),
        ));
        record.extend_from_slice(&frame[..captured]);
        self.writer.send_reserved(record)
    }

    pub fn stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// Writes what is queued and closes the file (see [`RecordWriter::finish`]).
    pub fn finish(&self) {
        self.writer.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a pcap file back: (snaplen, linktype, frames).
    fn parse(bytes: &[u8]) -> (u32, u32, Vec<Vec<u8>>) {
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(0), MAGIC);
        assert_eq!(&bytes[4..8], &[2, 0, 4, 0]);
        let mut frames = Vec::new();
        let mut at = GLOBAL_HEADER_LEN;
        while at < bytes.len() {
            let captured = u32_at(at + 8) as usize;
            let original = u32_at(at + 12) as usize;
            assert!(captured <= original);
            frames.push(bytes[at + 16..at + 16 + captured].to_vec());
            at += 16 + captured;
        }
        assert_eq!(at, bytes.len(), "a record runs past the end");
        (u32_at(16), u32_at(20), frames)
    }

    #[test]
    fn frames_are_written_as_pcap_records_and_each_rotated_file_is_whole() {
        let dir = std::env::temp_dir().join(format!("netfence-pcap-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spec = FileSpec {
            path: dir.join("t.pcap"),
            max_bytes: 2000,
            keep: 5,
        };
        let log = PcapLog::create(spec.clone(), 1 << 20).unwrap();
        let sent: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 300 + usize::from(i)]).collect();
        for f in &sent {
            assert!(log.record(f));
        }
        // A TSO-sized frame is recorded whole.
        let big = vec![0xabu8; 65_549];
        assert!(log.record(&big));
        log.finish();
        let mut got = Vec::new();
        for n in (1..=5).rev() {
            let p = super::super::writer::numbered(&spec.path, n);
            if let Ok(bytes) = std::fs::read(&p) {
                let (snaplen, linktype, frames) = parse(&bytes);
                assert_eq!((snaplen, linktype), (SNAPLEN, LINKTYPE_ETHERNET));
                assert!(
                    bytes.len() <= 2000,
                    "{} is {} bytes",
                    p.display(),
                    bytes.len()
                );
                got.extend(frames);
            }
        }
        let (_, _, last) = parse(&std::fs::read(&spec.path).unwrap());
        got.extend(last);
        let mut want = sent.clone();
        want.push(big);
        assert_eq!(got, want);
        assert_eq!(log.stats().written, 11);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_queue_drops_without_copying() {
        let dir = std::env::temp_dir().join(format!("netfence-pcap-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spec = FileSpec {
            path: dir.join("t.pcap"),
            max_bytes: 1 << 20,
            keep: 0,
        };
        // Room for one small frame at a time: a large one never fits.
        let log = PcapLog::create(spec, 100).unwrap();
        assert!(!log.record(&[0u8; 200]));
        assert_eq!(log.stats().dropped, 1);
        log.finish();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
