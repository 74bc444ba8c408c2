//! The writer behind `--pcap` and `--audit`: encoded records go from the link threads to a
//! thread of their own through a queue bounded in bytes, and from there into a file that is
//! rotated at a size bound.
//!
//! Theory of operation. A link thread never waits for a disk. [`RecordWriter::reserve`] adds a
//! record's length to the bytes queued; when that would pass the queue's bound (a named limit:
//! `pcap-queue-bytes`, `audit-queue-bytes`) the record is dropped and counted instead, so a
//! slow disk costs records, never datapath time, and the memory held is bounded. A reserved
//! record is built (only then: a dropped frame costs no copy) and handed to the writer thread
//! over a channel ([`RecordWriter::send_reserved`]). The writer thread appends records to a
//! [`RotatingFile`], subtracts what it took from the bytes queued and flushes whenever the
//! queue is empty, so the file is complete whenever the datapath is idle.
//!
//! [`RotatingFile`] keeps one file under `max_bytes`: when the next record would take it past
//! the bound, FILE.(k-1) becomes FILE.k, ..., FILE becomes FILE.1 (at most `keep` old files; the
//! oldest goes) and a new FILE starts with the format's header (the pcap global header; none
//! for JSON lines). A FILE already there at start-up is rotated the same way, never truncated.
//! Files are created 0600. A write error (a full disk) is logged, the records meanwhile are
//! counted as lost, and after [`WRITE_RETRY`] a fresh file is started.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
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
/// Bytes the writer thread buffers before a write(2).
const WRITE_BUFFER: usize = 256 * 1024;
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

/// A file of records that rotates at a size bound (see the module comment).
pub struct RotatingFile {
    spec: FileSpec,
    /// Written at the start of every file.
    header: Vec<u8>,
    out: BufWriter<File>,
    /// Bytes in the current file (header included), buffered ones too.
    written: u64,
    /// Rotations so far (the one at start-up of an existing file included).
    pub rotations: u64,
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
            Ok(_) => {
                shift_old_files(&spec)?;
                rotations += 1;
            }
            Err(_) => {}
        }
        let mut file = RotatingFile {
            out: BufWriter::with_capacity(WRITE_BUFFER, open_new(&spec.path)?),
            spec,
            header,
            written: 0,
            rotations,
        };
        file.start()?;
        Ok(file)
    }

    fn start(&mut self) -> io::Result<()> {
        self.written = self.header.len() as u64;
        let header = std::mem::take(&mut self.header);
        let result = self.out.write_all(&header);
        self.header = header;
        result
    }

    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    /// Appends one record, rotating first if it would take the file past its bound (a file
    /// that holds nothing but its header takes any record).
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        let len = record.len() as u64;
        if self.written + len > self.spec.max_bytes && self.written > self.header.len() as u64 {
            self.rotate()?;
        }
        self.out.write_all(record)?;
        self.written += len;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Closes the current file, shifts the old ones and starts a new one.
    pub fn rotate(&mut self) -> io::Result<()> {
        // What cannot be flushed any more (the error that made us rotate) is lost.
        let _ = self.out.flush();
        shift_old_files(&self.spec)?;
        self.out = BufWriter::with_capacity(WRITE_BUFFER, open_new(&self.spec.path)?);
        self.rotations += 1;
        self.start()
    }
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
    /// Records written (buffered for the file).
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
                    Message::Record(record) => self.write(&record),
                    Message::Stop => break 'outer,
                }
                next = rx.try_recv().ok();
            }
            // The queue is empty: what was written reaches the file now.
            if let Err(e) = self.file.flush() {
                self.failed(&e);
            }
            self.report_drops(false);
        }
        if let Err(e) = self.file.flush() {
            self.failed(&e);
        }
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

    fn write(&mut self, record: &[u8]) {
        self.shared.queued.fetch_sub(record.len(), Ordering::AcqRel);
        if let Some(at) = self.failed_at {
            if at.elapsed() < WRITE_RETRY {
                self.shared.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Err(e) = self.file.rotate() {
                self.failed(&e);
                self.shared.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.failed_at = None;
            info!(what = self.what, path = %self.file.path().display(), "{} writing again after an error (new file)", self.what);
        }
        match self.file.append(record) {
            Ok(()) => {
                self.shared.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed(&e);
                self.shared.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
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

    #[test]
    fn files_rotate_at_the_bound_and_keep_at_most_keep_old_ones() {
        let dir = scratch("rotate");
        let spec = FileSpec {
            path: dir.join("r.log"),
            max_bytes: 100,
            keep: 2,
        };
        let mut f = RotatingFile::create(spec.clone(), b"HDR\n".to_vec()).unwrap();
        for i in 0..40u32 {
            f.append(format!("record {i:04}\n").as_bytes()).unwrap();
        }
        f.flush().unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        for p in [
            spec.path.clone(),
            numbered(&spec.path, 1),
            numbered(&spec.path, 2),
        ] {
            let text = read(&p);
            assert!(text.starts_with("HDR\n"), "{}: {text}", p.display());
            assert!(text.len() <= 100, "{} is {} bytes", p.display(), text.len());
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
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&spec.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A restart keeps the last run's file as FILE.1.
        drop(f);
        let before = read(&spec.path);
        let _f = RotatingFile::create(spec.clone(), b"HDR\n".to_vec()).unwrap();
        assert_eq!(read(&numbered(&spec.path, 1)), before);
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
        let mut f = RotatingFile::create(spec.clone(), Vec::new()).unwrap();
        for _ in 0..5 {
            f.append(b"12345678\n").unwrap();
        }
        f.flush().unwrap();
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
