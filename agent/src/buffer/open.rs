//! Opening a buffer: the lock another process may hold, refusing a directory sled would
//! silently reset, and finishing a renumbering a crash interrupted.

use super::*;

/// How long `open` waits for a lock to go away before reporting `Locked` (longer than
/// sled's 500 ms flush interval, after which a closed buffer's file is released).
const LOCK_GRACE: Duration = Duration::from_millis(1_500);

impl Buffer {
    /// Opens (or creates) the buffer under `state_dir`, finishing a renumbering a crash
    /// interrupted.
    pub fn open(state_dir: &Path, max_bytes: u64) -> Result<Buffer, BufferError> {
        std::fs::create_dir_all(state_dir).map_err(|source| BufferError::CreateDir {
            path: state_dir.display().to_string(),
            source,
        })?;
        let path = buffer_dir(state_dir);
        let shown = path.display().to_string();
        let existed = std::fs::metadata(path.join("db")).is_ok_and(|m| m.len() > 0);
        // sled reports its lock as an ErrorKind::Other error with a formatted message, so
        // a running agent is detected here, with the same lock sled takes, before sled
        // could be mistaken for a corrupt directory.
        // A lock that goes away within LOCK_GRACE is this process's own buffer, closed a
        // moment ago: sled's flusher thread holds the file until its next tick.
        let since = std::time::Instant::now();
        while locked_by_another(&path.join("db")) {
            if since.elapsed() >= LOCK_GRACE {
                return Err(BufferError::Locked { path: shown });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let db = sled_config(&path)
            .open()
            .map_err(|source| open_error(&shown, source))?;
        // Fail early, with the path, on a directory sled opened but cannot read, and
        // refuse one it opened as empty although it held a buffer: sled recovers some
        // corruptions by starting over, which would silently lose the backlog.
        let io_error = |source| open_error(&shown, source);
        let incarnation = match db.get(NEXT_SEQ).map_err(io_error)? {
            Some(_) => db
                .get(INCARNATION)
                .map_err(io_error)?
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default(),
            None if existed => {
                return Err(BufferError::Corrupt {
                    path: shown,
                    reason: "it holds no edgeprobe data although it existed (reset or corrupted)"
                        .into(),
                })
            }
            None => {
                let incarnation = format!("{:032x}", rand::random::<u128>());
                let mut batch = sled::Batch::default();
                batch.insert(NEXT_SEQ, &1u64.to_be_bytes());
                batch.insert(INCARNATION, incarnation.as_bytes());
                db.apply_batch(batch).map_err(io_error)?;
                db.flush().map_err(io_error)?;
                incarnation
            }
        };
        let chunking = Chunking::from_env();
        if let Some(journal) = Renumber::read(&db).map_err(io_error)? {
            tracing::info!(
                committed_seq = journal.committed,
                "finishing a renumbering interrupted by a crash"
            );
            journal.finish(&db, chunking).map_err(io_error)?;
            db.flush().map_err(io_error)?;
            tracing::info!(
                next_seq = read_u64(&db, NEXT_SEQ).map_err(io_error)?,
                "renumbering finished"
            );
        }
        let data_file = File::open(path.join("db")).map_err(|source| BufferError::Sync {
            path: path.display().to_string(),
            source,
        })?;
        let last = read_u64(&db, NEXT_SEQ)
            .unwrap_or(0)
            .max(1)
            .saturating_sub(1);
        let (appended, _) = watch::channel(last);
        let (tx, rx) = std_mpsc::channel();
        let inner = Arc::new(Inner {
            tree: db,
            path,
            incarnation,
            chunking,
            commands: Mutex::new(Some(tx)),
            appended,
            thread: Mutex::new(None),
            unpersisted_drops: AtomicU64::new(0),
        });
        let writer = Writer {
            inner: inner.clone(),
            data_file,
            max_bytes: max_bytes.max(1),
            burst: 0,
            failed_burst: 0,
        };
        let handle = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || writer.run(rx))
            .expect("cannot spawn the buffer writer thread");
        *inner.thread.lock().unwrap() = Some(handle);
        Ok(Buffer { inner })
    }
}

/// The sled settings of the buffer (the same on every open).
pub(super) fn sled_config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(8 * 1024 * 1024)
        .mode(sled::Mode::LowSpace)
}

/// True when another process holds the lock sled takes on its data file (an exclusive
/// flock): a running agent. Taken and released at once, before sled takes it for real.
fn locked_by_another(db_file: &Path) -> bool {
    use fs2::FileExt;
    let Ok(file) = File::open(db_file) else {
        return false;
    };
    match file.try_lock_exclusive() {
        Ok(()) => {
            let _ = FileExt::unlock(&file);
            false
        }
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// Sorts what sled says when opening: its lock (a running agent won the race with
/// `locked_by_another`), a corrupt directory (the only case where moving it aside is the
/// advice), or any other I/O trouble (permissions, ...), which is not the data's fault.
fn open_error(path: &str, source: sled::Error) -> BufferError {
    let path = path.to_string();
    match &source {
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock") =>
        {
            BufferError::Locked { path }
        }
        sled::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            BufferError::Corrupt {
                path,
                reason: source.to_string(),
            }
        }
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => BufferError::Corrupt {
            path,
            reason: source.to_string(),
        },
        _ => BufferError::Open { path, source },
    }
}
