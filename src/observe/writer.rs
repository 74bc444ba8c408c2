//! The writer behind `--pcap` and `--audit`: encoded records go from the link threads to a
//! thread of their own through a queue bounded in bytes, and from there into a file that is
//! rotated at a size bound.
//!
//! Theory of operation. A link thread never waits for a disk. [`RecordWriter::reserve`] adds a
//! record's length to the bytes queued; when that would pass the queue's bound (a named limit:
//! `pcap-queue-bytes`, `audit-queue-bytes`) the record is dropped and counted instead, so a
//! slow disk costs records, never datapath time, and the memory held is bounded. A reserved
//! record is built (only then: a dropped frame costs no copy) and handed to the writer thread
//! over a channel ([`RecordWriter::send_reserved`]). The writer thread collects records for a
//! [`RotatingFile`] and writes them with one `writev` when it holds 256 KiB or the channel is
//! empty (so the file is complete whenever the datapath is idle); only then are they taken off
//! the bytes queued, so the bound covers what the writer holds too.
//!
//! [`RotatingFile`] keeps one file under `max_bytes`: when the next record would take it past
//! the bound, FILE.(k-1) becomes FILE.k, ..., FILE becomes FILE.1 (at most `keep` old files; the
//! oldest goes) and a new FILE starts with the format's header (the pcap global header; none
//! for JSON lines). A FILE already there at start-up is rotated the same way, never truncated;
//! one that is not a regular file (a device, a symlink) is refused.
//! Files are created 0600. A write error (a full disk) is logged, the records meanwhile are
//! counted as lost, and after [`WRITE_RETRY`] a fresh file is started.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::LogGate;

/// After a write error, records are counted as lost for this long; then a new file is tried.
pub const WRITE_RETRY: Duration = Duration::from_secs(10);
/// How often the writer thread reports new drops (at most).
const DROP_REPORT: Duration = Duration::from_secs(10);
/// How long [`RecordWriter::finish`] waits for the writer thread to write what is queued.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of records the writer thread holds before it writes them (one `writev`).
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Records it holds at most (a `writev` takes at most IOV_MAX = 1024 buffers).
const WRITE_BATCH_RECORDS: usize = 512;
/// Most old files a rotation keeps (`--pcap-files`, `--audit-files`).
pub const MAX_KEEP: u32 = 100;

/// Where records go and how much of them is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    pub path: PathBuf,
    /// A file is rotated before a record would take it past this size.
    pub max_bytes: u64,
    /// Old files kept: FILE.1 (the newest) to FILE.keep.
    pub keep: u32,
}

/// `path` with `.n` appended (`trace.pcap` -> `trace.pcap.2`).
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// A file of records that rotates at a size bound (see the module comment). Records are held
/// until [`RotatingFile::flush`] writes them with one `writev`: the writer thread copies no
/// byte itself.
pub struct RotatingFile {
    spec: FileSpec,
    /// Written at the start of every file.
    header: Vec<u8>,
    file: File,
    /// Records taken and not yet written, and their bytes.
    pending: Vec<Vec<u8>>,
    pending_bytes: usize,
    /// Bytes in the current file (header included), pending ones too.
    size: u64,
    /// Rotations so far (the one at start-up of an existing file included).
    pub rotations: u64,
}

/// What [`RotatingFile::flush`] did with the records it held.
pub struct Flushed {
    pub records: u64,
    pub bytes: usize,
    /// `Err`: the records were lost.
    pub result: io::Result<()>,
}

impl RotatingFile {
    /// Starts `spec.path` (mode 0600) with `header`; an existing file there is rotated away
    /// first. Fails as opening the file fails (no directory, no permission, a directory).
    pub fn create(spec: FileSpec, header: Vec<u8>) -> io::Result<Self> {
        let mut rotations = 0;
        match std::fs::symlink_metadata(&spec.path) {
            Ok(meta) if meta.is_dir() => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    "is a directory; expected a file name",
                ))
            }
            Ok(meta) if meta.is_file() => {
                shift_old_files(&spec)?;
                rotations += 1;
            }
            // A device, a pipe, a symlink: rotating would rename what is not ours.
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a regular file; refusing to touch it",
                ))
            }
            Err(_) => {}
        }
        let mut file = RotatingFile {
            file: open_new(&spec.path)?,
            spec,
            header,
            pending: Vec::new(),
            pending_bytes: 0,
            size: 0,
            rotations,
        };
        file.start()?;
        Ok(file)
    }

    fn start(&mut self) -> io::Result<()> {
        self.size = self.header.len() as u64;
        self.file.write_all(&self.header)
    }

    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    /// Whether a record of `len` bytes would take the file past its bound (a file that holds
    /// nothing but its header takes any record).
    pub fn would_pass(&self, len: usize) -> bool {
        self.size + len as u64 > self.spec.max_bytes && self.size > self.header.len() as u64
    }

    /// Takes a record, to be written at the next [`RotatingFile::flush`].
    pub fn push(&mut self, record: Vec<u8>) {
        self.size += record.len() as u64;
        self.pending_bytes += record.len();
        self.pending.push(record);
    }

    /// Whether enough is held to be worth a write now.
    pub fn batch_full(&self) -> bool {
        self.pending_bytes >= WRITE_BATCH_BYTES || self.pending.len() >= WRITE_BATCH_RECORDS
    }

    /// Writes the records held (one `writev` while the kernel takes everything); they are
    /// gone either way.
    pub fn flush(&mut self) -> Flushed {
        let records = self.pending.len() as u64;
        let bytes = std::mem::take(&mut self.pending_bytes);
        let result = write_all_vectored(&mut self.file, &self.pending);
        self.pending.clear();
        Flushed {
            records,
            bytes,
            result,
        }
    }

    /// Closes the current file, shifts the old ones and starts a new one (flush first: records
    /// still held would be written to the new file).
    pub fn rotate(&mut self) -> io::Result<()> {
        shift_old_files(&self.spec)?;
        self.file = open_new(&self.spec.path)?;
        self.rotations += 1;
        self.start()?;
        self.size += self.pending_bytes as u64;
        Ok(())
    }
}

/// Writes every byte of `records`, as few `writev` calls as the kernel allows.
fn write_all_vectored(file: &mut File, records: &[Vec<u8>]) -> io::Result<()> {
    let mut slices: Vec<IoSlice> = records.iter().map(|r| IoSlice::new(r)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// FILE.(keep-1) -> FILE.keep, ..., FILE -> FILE.1; with `keep` 0, FILE is removed.
fn shift_old_files(spec: &FileSpec) -> io::Result<()> {
    let ignore_missing = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    if spec.keep == 0 {
        return ignore_missing(std::fs::remove_file(&spec.path));
    }
    for n in (1..spec.keep).rev() {
        ignore_missing(std::fs::rename(
            numbered(&spec.path, n),
            numbered(&spec.path, n + 1),
        ))?;
    }
    ignore_missing(std::fs::rename(&spec.path, numbered(&spec.path, 1)))
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

enum Message {
    Record(Vec<u8>),
    Stop,
}

/// What a writer did, shared between the link threads and its thread.
#[derive(Default)]
struct Shared {
    /// Bytes of records reserved and not yet written.
    queued: AtomicUsize,
    /// Records dropped because the queue was full (or the writer had stopped).
    dropped: AtomicU64,
    /// Records written to the file.
    written: AtomicU64,
    /// Records lost to write errors.
    lost: AtomicU64,
}

/// The link threads' end of a writer thread (see the module comment).
pub struct RecordWriter {
    /// What the records are, for log lines ("pcap", "audit").
    what: &'static str,
    /// Bytes of records queued at most.
    limit: usize,
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    /// The writer thread says it is done through this.
    done: Mutex<Option<mpsc::Receiver<()>>>,
}

/// Figures of a writer, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub written: u64,
    pub dropped: u64,
    pub lost: u64,
}

impl RecordWriter {
    /// Starts the writer thread of `file`, with at most `limit` bytes of records queued.
    pub fn start(
        what: &'static str,
        limit_name: &'static str,
        limit: usize,
        file: RotatingFile,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        thread::Builder::new()
            .name(format!("netfence-{what}"))
            .spawn(move || {
                let mut thread = WriterThread {
                    what,
                    limit_name,
                    file,
                    shared: thread_shared,
                    failed_at: None,
                    error_log: LogGate::new(3, Duration::from_secs(60)),
                    reported_drops: 0,
                    last_report: Instant::now(),
                };
                thread.run(rx);
                let _ = done_tx.send(());
            })?;
        Ok(RecordWriter {
            what,
            limit,
            tx,
            shared,
            done: Mutex::new(Some(done_rx)),
        })
    }

    /// Makes room for a record of `len` bytes; false (and counted as dropped) when the queue
    /// has no room for it. A true must be followed by [`RecordWriter::send_reserved`].
    #[inline]
    pub fn reserve(&self, len: usize) -> bool {
        let mut queued = self.shared.queued.load(Ordering::Relaxed);
        loop {
            if queued.saturating_add(len) > self.limit {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            match self.shared.queued.compare_exchange_weak(
                queued,
                queued + len,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => queued = now,
            }
        }
    }

    /// Hands a reserved record (exactly the reserved length) to the writer thread.
    pub fn send_reserved(&self, record: Vec<u8>) -> bool {
        let len = record.len();
        if self.tx.send(Message::Record(record)).is_err() {
            // The writer stopped (netfence is exiting).
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Reserves and sends `record`; false when it was dropped.
    pub fn push(&self, record: Vec<u8>) -> bool {
        self.reserve(record.len()) && self.send_reserved(record)
    }

    pub fn stats(&self) -> WriterStats {
        WriterStats {
            written: self.shared.written.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            lost: self.shared.lost.load(Ordering::Relaxed),
        }
    }

    /// Writes what is queued, closes the file and ends the thread (waiting at most a few
    /// seconds for a slow disk). Records pushed afterwards are dropped. Idempotent.
    pub fn finish(&self) {
        let Some(done) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let _ = self.tx.send(Message::Stop);
        if done.recv_timeout(FINISH_TIMEOUT).is_err() {
            warn!(
                what = self.what,
                "the {} writer did not finish within {FINISH_TIMEOUT:?}; its last records may be missing",
                self.what
            );
        }
    }
}

struct WriterThread {
    what: &'static str,
    limit_name: &'static str,
    file: RotatingFile,
    shared: Arc<Shared>,
    /// When a write last failed (records are lost until [`WRITE_RETRY`] later).
    failed_at: Option<Instant>,
    error_log: LogGate,
    reported_drops: u64,
    last_report: Instant,
}

impl WriterThread {
    fn run(&mut self, rx: mpsc::Receiver<Message>) {
        info!(what = self.what, path = %self.file.path().display(), "{} writer started", self.what);
        'outer: loop {
            let first = match rx.recv_timeout(DROP_REPORT) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.report_drops(false);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Record(record) => self.write(record),
                    Message::Stop => break 'outer,
                }
                next = rx.try_recv().ok();
            }
            // The queue is empty: what was taken reaches the file now.
            self.flush();
            self.report_drops(false);
        }
        self.flush();
        self.report_drops(true);
        let stats = (
            self.shared.written.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
            self.shared.lost.load(Ordering::Relaxed),
        );
        info!(
            what = self.what,
            path = %self.file.path().display(),
            records = stats.0,
            dropped = stats.1,
            lost = stats.2,
            rotations = self.file.rotations,
            "{} writer closed",
            self.what
        );
    }

    fn write(&mut self, record: Vec<u8>) {
        if let Some(at) = self.failed_at {
            if at.elapsed() < WRITE_RETRY {
                self.lose(record.len());
                return;
            }
            if let Err(e) = self.file.rotate() {
                self.failed(&e);
                self.lose(record.len());
                return;
            }
            self.failed_at = None;
            info!(what = self.what, path = %self.file.path().display(), "{} writing again after an error (new file)", self.what);
        }
        if self.file.would_pass(record.len()) {
            self.flush();
            if let Err(e) = self.file.rotate() {
                self.failed(&e);
                self.lose(record.len());
                return;
            }
        }
        self.file.push(record);
        if self.file.batch_full() {
            self.flush();
        }
    }

    /// Writes what the file holds; its bytes leave the queue's count either way.
    fn flush(&mut self) {
        let flushed = self.file.flush();
        self.shared
            .queued
            .fetch_sub(flushed.bytes, Ordering::AcqRel);
        match flushed.result {
            Ok(()) => {
                self.shared
                    .written
                    .fetch_add(flushed.records, Ordering::Relaxed);
            }
            Err(e) => {
                self.shared
                    .lost
                    .fetch_add(flushed.records, Ordering::Relaxed);
                self.failed(&e);
            }
        }
    }

    /// A record that will not be written.
    fn lose(&mut self, len: usize) {
        self.shared.queued.fetch_sub(len, Ordering::AcqRel);
        self.shared.lost.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&mut self, e: &io::Error) {
        self.failed_at = Some(Instant::now());
        if let Some(suppressed) = self.error_log.admit(Instant::now()) {
            error!(what = self.what, path = %self.file.path().display(), error = %e, suppressed,
                "cannot write the {} file; records are lost until a new file can be written", self.what);
        }
    }

    /// Logs drops since the last report, at most every [`DROP_REPORT`] (or now, `last`).
    fn report_drops(&mut self, last: bool) {
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped == self.reported_drops || (!last && self.last_report.elapsed() < DROP_REPORT) {
            return;
        }
        warn!(
            what = self.what,
            dropped = dropped - self.reported_drops,
            dropped_total = dropped,
            limit = self.limit_name,
            "{} records dropped: the writer's queue was full (raise --limit {}=BYTES, or the disk is slow)",
            self.what,
            self.limit_name
        );
        self.reported_drops = dropped;
        self.last_report = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "netfence-writer-{name}-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs a writer over `spec` with `header` and `records`, to its end.
    fn write_all(spec: &FileSpec, header: &[u8], records: &[Vec<u8>]) -> WriterStats {
        let file = RotatingFile::create(spec.clone(), header.to_vec()).unwrap();
        let w = RecordWriter::start("test", "test-queue-bytes", 1 << 20, file).unwrap();
        for r in records {
            assert!(w.push(r.clone()));
        }
        w.finish();
        w.stats()
    }

    #[test]
    fn files_rotate_at_the_bound_and_keep_at_most_keep_old_ones() {
        let dir = scratch("rotate");
        let spec = FileSpec {
            path: dir.join("r.log"),
            max_bytes: 100,
            keep: 2,
        };
        let records: Vec<Vec<u8>> = (0..40u32)
            .map(|i| format!("record {i:04}\n").into_bytes())
            .collect();
        let stats = write_all(&spec, b"HDR\n", &records);
        assert_eq!(stats.written, 40);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        for p in [
            spec.path.clone(),
            numbered(&spec.path, 1),
            numbered(&spec.path, 2),
        ] {
            let text = read(&p);
            assert!(text.starts_with("HDR\n"), "{}: {text}", p.display());
            assert!(text.len() <= 100, "{} is {} bytes", p.display(), text.len());
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
        assert!(
            !numbered(&spec.path, 3).exists(),
            "more than keep old files"
        );
        // The three files hold the last records in order, none missing between them.
        let kept: String = [
            numbered(&spec.path, 2),
            numbered(&spec.path, 1),
            spec.path.clone(),
        ]
        .iter()
        .map(|p| read(p)[4..].to_string())
        .collect();
        let numbers: Vec<u32> = kept
            .lines()
            .map(|l| l["record ".len()..].parse().unwrap())
            .collect();
        assert_eq!(numbers.last(), Some(&39));
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        // A restart keeps the last run's file as FILE.1.
        let before = read(&spec.path);
        let _f = RotatingFile::create(spec.clone(), b"HDR\n".to_vec()).unwrap();
        assert_eq!(read(&numbered(&spec.path, 1)), before);
        assert_eq!(read(&spec.path), "HDR\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keep_zero_starts_afresh_and_a_directory_is_refused() {
        let dir = scratch("keep0");
        let spec = FileSpec {
            path: dir.join("r.log"),
            max_bytes: 10,
            keep: 0,
        };
        write_all(&spec, b"", &vec![b"12345678\n".to_vec(); 5]);
        assert_eq!(std::fs::read(&spec.path).unwrap(), b"12345678\n");
        assert!(!numbered(&spec.path, 1).exists());
        let as_dir = FileSpec {
            path: dir.clone(),
            ..spec
        };
        assert!(RotatingFile::create(as_dir, Vec::new()).is_err());
        let missing = FileSpec {
            path: dir.join("no/such/dir/r.log"),
            max_bytes: 10,
            keep: 0,
        };
        assert!(RotatingFile::create(missing, Vec::new()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_that_is_not_regular_is_refused_untouched() {
        let dir = scratch("special");
        let link = dir.join("link.log");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        let spec = FileSpec {
            path: link.clone(),
            max_bytes: 10,
            keep: 2,
        };
        let e = RotatingFile::create(spec, Vec::new())
            .err()
            .expect("refused");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(!numbered(&link, 1).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A write that fails loses its records (counted) and those of the next
    /// [`WRITE_RETRY`]; then a fresh file is started and writing goes on.
    #[test]
    fn write_errors_lose_records_until_a_new_file_is_started() {
        let dir = scratch("errors");
        let spec = FileSpec {
            path: dir.join("e.log"),
            max_bytes: 1 << 20,
            keep: 1,
        };
        let mut file = RotatingFile::create(spec.clone(), b"H\n".to_vec()).unwrap();
        // A handle that cannot write: every write fails (EBADF), as on a full disk.
        file.file = File::open(&spec.path).unwrap();
        let shared = Arc::new(Shared::default());
        let mut t = WriterThread {
            what: "test",
            limit_name: "test-queue-bytes",
            file,
            shared: shared.clone(),
            failed_at: None,
            error_log: LogGate::new(3, Duration::from_secs(60)),
            reported_drops: 0,
            last_report: Instant::now(),
        };
        let record = |s: &str| {
            shared.queued.fetch_add(s.len(), Ordering::AcqRel);
            s.as_bytes().to_vec()
        };
        t.write(record("one\n"));
        t.flush();
        assert_eq!(shared.lost.load(Ordering::Relaxed), 1);
        assert!(t.failed_at.is_some());
        t.write(record("two\n"));
        assert_eq!(shared.lost.load(Ordering::Relaxed), 2, "lost while failed");
        t.failed_at = Instant::now().checked_sub(WRITE_RETRY);
        t.write(record("three\n"));
        t.flush();
        assert_eq!(shared.written.load(Ordering::Relaxed), 1);
        assert_eq!(
            shared.queued.load(Ordering::Relaxed),
            0,
            "every byte left the queue"
        );
        assert_eq!(std::fs::read(&spec.path).unwrap(), b"H\nthree\n");
        assert_eq!(std::fs::read(numbered(&spec.path, 1)).unwrap(), b"H\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_drops_are_counted() {
        let dir = scratch("queue");
        let spec = FileSpec {
            path: dir.join("q.log"),
            max_bytes: 1 << 20,
            keep: 0,
        };
        let file = RotatingFile::create(spec.clone(), Vec::new()).unwrap();
        let w = RecordWriter::start("test", "test-queue-bytes", 100, file).unwrap();
        // Larger than the whole queue: never taken.
        assert!(!w.push(vec![b'x'; 101]));
        assert_eq!(w.stats().dropped, 1);
        // Reserved but not yet sent: the queue is full for anything else.
        assert!(w.reserve(100));
        assert!(!w.push(b"y\n".to_vec()));
        assert_eq!(w.stats().dropped, 2);
        let mut full = vec![b'z'; 99];
        full.push(b'\n');
        assert!(w.send_reserved(full));
        w.finish();
        assert_eq!(
            w.stats(),
            WriterStats {
                written: 1,
                dropped: 2,
                lost: 0
            }
        );
        assert_eq!(std::fs::read(&spec.path).unwrap().len(), 100);
        assert!(!w.push(b"late\n".to_vec()), "taken after finish");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
