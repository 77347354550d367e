//! The Maildir spool (SPEC "Spool"): durable delivery of one accepted message.
//!
//! Contract of `Maildir::deliver`: the message is written to `tmp/UNIQUE` (the trace fields,
//! the content's memory part, then its spill's octets, copied in the kernel), the file is fsync'd,
//! renamed into `new/UNIQUE`, and `new/` itself is fsync'd so that the rename is on disk (one
//! fsync may cover the renames of several writers, `group_sync`); only
//! then does it return `Ok`, and only then may the session answer 250. On any failure the file
//! is removed (from `tmp/`, or from `new/` when the directory fsync failed: the client gets 451
//! 4.3.0 and will send again, so a copy left behind would be a duplicate) and a `SpoolError`
//! says which step failed. A process killed mid-write leaves at most a file in `tmp/`, which
//! `Maildir::open` removes 36 hours later (the Maildir convention, maildir(5)); so are the
//! spill files (`spill`) of messages that were still arriving.
//!
//! HELOGUARD_MIN_FREE_MB: a message whose file would leave less than that free is refused
//! before anything is written (`SpoolError::InsufficientSpace`, 452 4.3.1). Spills of messages
//! still arriving are on the disk already, so they count.
//!
//! Unique names follow maildir(5) and Courier/Dovecot: `SECS.M<micros>P<pid>Q<n>.<host>`, where
//! `n` is a process-wide counter, so names never repeat within one process even within the same
//! microsecond, and `/` and `:` in the host name are written `\057` and `\072`.

use std::fmt;
use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::IoSlice;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use crate::message::Envelope;
use crate::message::content::ContentSpill;
use crate::metrics::{Metrics, SpoolStage};
use crate::spool::envelope::maildir_prefix;
use crate::spool::group_sync::GroupSync;
use crate::spool::group_sync::copy_error;

/// maildir(5): a file in tmp/ untouched for 36 hours is the remains of a failed delivery.
pub(crate) const TMP_MAX_AGE: Duration = Duration::from_secs(36 * 3600);

/// Mail files and directories are the spool owner's and its group's, so that a delivery agent
/// in that group (Dovecot moving new/ to cur/) can read them and move them; the process umask
/// (the unit's UMask=0027) still applies, so nobody else ever reads mail.
const FILE_MODE: u32 = 0o640;
const DIR_MODE: u32 = 0o770;

/// Process-wide part of unique names: never the same twice in this process.
static DELIVERIES: AtomicU64 = AtomicU64::new(0);

/// One Maildir: its three directories, and an open handle on `new/` to fsync after a rename.
#[derive(Debug)]
pub(crate) struct Maildir {
    tmp: PathBuf,
    new: PathBuf,
    /// Opened once: fsync on a directory handle makes the renames into it durable.
    new_handle: File,
    /// One fsync of new/ covers every rename that finished before it started.
    new_sync: GroupSync,
    /// The host name part of unique names, already escaped.
    name_host: String,
    metrics: Option<std::sync::Arc<Metrics>>,
    /// HELOGUARD_MIN_FREE_MB in octets: a message that would leave less free is refused.
    min_free: u64,
}

/// See [`Maildir::panic_counter`].
pub(crate) struct PanicCounter<'a>(&'a Maildir);

impl Drop for PanicCounter<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.count(Metrics::panicked);
        }
    }
}

/// Which step of opening the spool or delivering a message failed. Every variant but
/// `InsufficientSpace` (452 4.3.1) answers 451 4.3.0 to the client (SPEC "Spool": never 250
/// after a write or fsync error).
#[derive(Debug)]
pub(crate) enum SpoolError {
    /// Creating or opening one of the Maildir directories.
    Directory { path: PathBuf, source: io::Error },
    /// Creating the file in tmp/.
    Create { path: PathBuf, source: io::Error },
    /// Writing the message into it.
    Write { path: PathBuf, source: io::Error },
    /// fsync of the file.
    SyncFile { path: PathBuf, source: io::Error },
    /// The rename from tmp/ into new/.
    Rename { path: PathBuf, source: io::Error },
    /// fsync of new/ after the rename.
    SyncDirectory { path: PathBuf, source: io::Error },
    /// Storing the message would leave less than HELOGUARD_MIN_FREE_MB free on the spool's
    /// filesystem: the client gets 452 4.3.1, not 451.
    InsufficientSpace {
        path: PathBuf,
        free: u64,
        needed: u64,
    },
    /// The writer threads are gone; nothing was written.
    WritersGone,
    /// Every writer is busy and the job queue is full; nothing was written.
    QueueFull,
    /// The writer panicked while on this message; whether a file reached new/ is unknown.
    WriterPanicked,
}

impl Maildir {
    /// Opens (creating as needed) the Maildir at `dir` and removes stale files from its tmp/.
    /// `hostname` is the last part of every unique file name.
    pub(crate) fn open(dir: &Path, hostname: &str) -> Result<Maildir, SpoolError> {
        let tmp = dir.join("tmp");
        let new = dir.join("new");
        let created_root = create_dir(dir)?;
        let mut created_sub = false;
        for path in [&tmp, &new, &dir.join("cur")] {
            created_sub |= create_dir(path)?;
        }
        // A directory just made is durable only once the directory holding it is fsync'd;
        // otherwise a crash could take new/ away with messages already answered 250.
        if created_sub {
            sync_dir(dir)?;
        }
        if created_root {
            sync_dir(parent_of(dir))?;
        }
        let new_handle = File::open(&new).map_err(|source| SpoolError::Directory {
            path: new.clone(),
            source,
        })?;
        let maildir = Maildir {
            tmp,
            new,
            new_handle,
            new_sync: GroupSync::default(),
            name_host: escape_host(hostname),
            metrics: None,
            min_free: 0,
        };
        maildir.remove_stale_tmp(SystemTime::now(), TMP_MAX_AGE);
        Ok(maildir)
    }

    /// Counts write, fsync and rename failures and the bytes delivered into `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: std::sync::Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Refuses (`SpoolError::InsufficientSpace`) a message that would leave less than
    /// `min_free_mb` MiB free on the spool's filesystem; 0 = never.
    pub(crate) fn with_min_free_mb(mut self, min_free_mb: u64) -> Self {
        self.min_free = min_free_mb.saturating_mul(1024 * 1024);
        self
    }

    /// The directory spill files and messages being written live in.
    pub(super) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// HELOGUARD_MIN_FREE_MB at the end of data: what is free now (spills of messages still
    /// arriving already count, being on the disk) minus this message's final file.
    fn check_free_space(&self, octets: u64) -> Result<(), SpoolError> {
        if self.min_free == 0 {
            return Ok(());
        }
        let free = match free_space_bytes(&self.tmp) {
            Ok(free) => free,
            Err(err) => {
                // The write itself will say whether there is room.
                log::warn!(
                    "spool: cannot read free space of {}: {err}",
                    self.tmp.display()
                );
                return Ok(());
            }
        };
        if free.saturating_sub(octets) < self.min_free {
            return Err(SpoolError::InsufficientSpace {
                path: self.tmp.clone(),
                free,
                needed: octets,
            });
        }
        Ok(())
    }

    /// A guard that counts a panic (`heloguard_panics_total`) when dropped while unwinding,
    /// so a writer job that panics is counted whoever catches the panic.
    pub(crate) fn panic_counter(&self) -> PanicCounter<'_> {
        PanicCounter(self)
    }

    fn count(&self, event: impl FnOnce(&Metrics)) {
        if let Some(metrics) = &self.metrics {
            event(metrics);
        }
    }

    /// Writes `env` durably into new/ (see the module docs); returns the file's name in new/.
    /// The file is `maildir_prefix` followed by the message without the forged trace fields.
    #[cfg(test)]
    pub(crate) fn deliver(&self, env: &Envelope) -> Result<String, SpoolError> {
        one(self.deliver_all(&[env]))
    }

    /// `deliver` for several messages at once: each is written, fsync'd and renamed on its
    /// own, and one fsync of new/ then covers all the renames. A failure stays with its
    /// message; the results are in the order of `envs`.
    pub(crate) fn deliver_all(&self, envs: &[&Envelope]) -> Vec<Result<String, SpoolError>> {
        let prefixes: Vec<Vec<u8>> = envs.iter().map(|env| maildir_prefix(env)).collect();
        let parts: Vec<[&[u8]; 2]> = prefixes
            .iter()
            .zip(envs)
            .map(|(prefix, env)| [prefix.as_slice(), env.content.memory.as_slice()])
            .collect();
        let messages: Vec<Outgoing<'_>> = parts
            .iter()
            .zip(envs)
            .map(|(parts, env)| Outgoing {
                parts,
                spill: env.content.spill.as_deref(),
            })
            .collect();
        self.store_outgoing(&messages)
    }

    /// Writes the concatenation of `parts` durably into new/ under a fresh unique name.
    #[cfg(test)]
    pub(crate) fn store(&self, parts: &[&[u8]]) -> Result<String, SpoolError> {
        one(self.store_all(&[parts]))
    }

    /// `store` for several messages, sharing the fsync of new/ as `deliver_all` does.
    #[cfg(test)]
    pub(crate) fn store_all(&self, messages: &[&[&[u8]]]) -> Vec<Result<String, SpoolError>> {
        let messages: Vec<Outgoing<'_>> = messages
            .iter()
            .map(|parts| Outgoing { parts, spill: None })
            .collect();
        self.store_outgoing(&messages)
    }

    fn store_outgoing(&self, messages: &[Outgoing<'_>]) -> Vec<Result<String, SpoolError>> {
        let mut renamed: Vec<Result<(String, PathBuf), SpoolError>> = messages
            .iter()
            .map(|message| self.write_and_rename(message))
            .collect();
        if renamed.iter().any(Result::is_ok)
            && let Err(source) = self.new_sync.sync(|| self.new_handle.sync_all())
        {
            // Not durable, so not delivered: the client gets 451 and sends again, and a copy
            // left in new/ would be a duplicate.
            for result in &mut renamed {
                if let Ok((_, new_path)) = result {
                    remove_quietly(new_path);
                    self.count(|m| m.spool_error(SpoolStage::Fsync));
                    *result = Err(SpoolError::SyncDirectory {
                        path: self.new.clone(),
                        source: copy_error(&source),
                    });
                }
            }
        }
        renamed
            .into_iter()
            .zip(messages)
            .map(|(result, message)| {
                let bytes = message.len();
                result
                    .map(|(name, _)| name)
                    .inspect(|_| self.count(|m| m.spool_bytes(bytes)))
            })
            .collect()
    }

    /// Creates, writes and fsyncs tmp/UNIQUE and renames it into new/; returns the name and
    /// the path in new/. On failure nothing is left behind in tmp/.
    fn write_and_rename(&self, message: &Outgoing<'_>) -> Result<(String, PathBuf), SpoolError> {
        self.check_free_space(message.len())?;
        let name = self.unique_name();
        let tmp_path = self.tmp.join(&name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp_path)
            .map_err(|source| SpoolError::Create {
                path: tmp_path.clone(),
                source,
            })
            .inspect_err(|_| self.count(|m| m.spool_error(SpoolStage::Write)))?;
        let written = write_all_parts(&mut file, message.parts)
            .and_then(|()| copy_spill(&file, message.spill))
            .map_err(|source| SpoolError::Write {
                path: tmp_path.clone(),
                source,
            })
            .inspect_err(|_| self.count(|m| m.spool_error(SpoolStage::Write)))
            .and_then(|()| {
                file.sync_all()
                    .map_err(|source| SpoolError::SyncFile {
                        path: tmp_path.clone(),
                        source,
                    })
                    .inspect_err(|_| self.count(|m| m.spool_error(SpoolStage::Fsync)))
            });
        drop(file);
        let new_path = self.new.join(&name);
        let renamed = written.and_then(|()| {
            fs::rename(&tmp_path, &new_path)
                .map_err(|source| SpoolError::Rename {
                    path: new_path.clone(),
                    source,
                })
                .inspect_err(|_| self.count(|m| m.spool_error(SpoolStage::Rename)))
        });
        if let Err(err) = renamed {
            remove_quietly(&tmp_path);
            return Err(err);
        }
        Ok((name, new_path))
    }

    /// Removes every file in tmp/ whose modification time is more than `max_age` before `now`.
    /// Failures are logged, not fatal: a stale file costs disk space, not correctness. The
    /// modification time is used rather than maildir(5)'s access time, which relatime and
    /// noatime mounts do not keep up to date.
    pub(crate) fn remove_stale_tmp(&self, now: SystemTime, max_age: Duration) -> usize {
        let entries = match fs::read_dir(&self.tmp) {
            Ok(entries) => entries,
            Err(err) => {
                log::warn!("spool: cannot list {}: {err}", self.tmp.display());
                return 0;
            }
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if is_stale_file(&entry, now, max_age) {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(err) => log::warn!("spool: cannot remove {}: {err}", path.display()),
                }
            }
        }
        if removed > 0 {
            log::info!(
                "spool: removed {removed} stale files from {}",
                self.tmp.display()
            );
        }
        removed
    }

    /// maildir(5): `SECS.M<micros>P<pid>Q<n>.<host>`.
    pub(super) fn unique_name(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let n = DELIVERIES.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            n,
            self.name_host
        )
    }
}

/// One message to write: `parts`, then the spill's octets.
struct Outgoing<'a> {
    parts: &'a [&'a [u8]],
    spill: Option<&'a dyn ContentSpill>,
}

impl Outgoing<'_> {
    fn len(&self) -> u64 {
        let parts: u64 = self.parts.iter().map(|part| part.len() as u64).sum();
        parts + self.spill.map_or(0, |spill| spill.len())
    }
}

/// Appends the spill's octets to `file` (in the kernel, with copy_file_range, where it can).
fn copy_spill(file: &File, spill: Option<&dyn ContentSpill>) -> io::Result<()> {
    let Some(spill) = spill else {
        return Ok(());
    };
    let copied = spill.copy_to(file)?;
    if copied != spill.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("spill holds {copied} of {} octets", spill.len()),
        ));
    }
    Ok(())
}

/// The single result of a one-message batch (which always has one).
#[cfg(test)]
fn one(results: Vec<Result<String, SpoolError>>) -> Result<String, SpoolError> {
    results
        .into_iter()
        .next()
        .unwrap_or(Err(SpoolError::WritersGone))
}

/// Free space for an unprivileged user on the filesystem holding `dir`, in MiB
/// (HELOGUARD_MIN_FREE_MB: below it MAIL gets 452 4.3.1).
pub(crate) fn free_space_mb(dir: &Path) -> io::Result<u64> {
    Ok(free_space_bytes(dir)? / (1024 * 1024))
}

/// Free space for an unprivileged user on the filesystem holding `dir`, in octets.
pub(crate) fn free_space_bytes(dir: &Path) -> io::Result<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string alive for the call, and `stat` points to memory
    // large enough for one `statvfs`, which the call fills in completely when it returns 0.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        stat.assume_init()
    };
    // f_bavail counts blocks of f_frsize bytes available to unprivileged users (POSIX).
    #[allow(
        clippy::useless_conversion,
        reason = "fsblkcnt_t and c_ulong are 32 bits wide on some targets"
    )]
    Ok(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (step, path, source) = match self {
            SpoolError::Directory { path, source } => ("cannot create or open", path, source),
            SpoolError::Create { path, source } => ("cannot create", path, source),
            SpoolError::Write { path, source } => ("cannot write", path, source),
            SpoolError::SyncFile { path, source } => ("cannot fsync", path, source),
            SpoolError::Rename { path, source } => ("cannot rename into", path, source),
            SpoolError::SyncDirectory { path, source } => ("cannot fsync directory", path, source),
            SpoolError::InsufficientSpace { path, free, needed } => {
                return write!(
                    f,
                    "spool: {needed} octets would leave less than the minimum free on {} \
                     ({free} free)",
                    path.display()
                );
            }
            SpoolError::WritersGone => return f.write_str("spool writer threads are gone"),
            SpoolError::QueueFull => return f.write_str("spool writer queue is full"),
            SpoolError::WriterPanicked => return f.write_str("spool writer panicked"),
        };
        write!(f, "spool: {step} {}: {source}", path.display())
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpoolError::Directory { source, .. }
            | SpoolError::Create { source, .. }
            | SpoolError::Write { source, .. }
            | SpoolError::SyncFile { source, .. }
            | SpoolError::Rename { source, .. }
            | SpoolError::SyncDirectory { source, .. } => Some(source),
            SpoolError::InsufficientSpace { .. }
            | SpoolError::WritersGone
            | SpoolError::QueueFull
            | SpoolError::WriterPanicked => None,
        }
    }
}

/// Creates the directory `path` (its parent must exist); true when it did not exist before.
fn create_dir(path: &Path) -> Result<bool, SpoolError> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(false),
        Err(source) => Err(SpoolError::Directory {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn sync_dir(path: &Path) -> Result<(), SpoolError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| SpoolError::SyncDirectory {
            path: path.to_path_buf(),
            source,
        })
}

/// The directory holding `path`; `.` for a relative path of one component such as `spool`.
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Writes every part, in order, with as few system calls as the kernel allows, and without
/// first copying the parts (the message body among them) into one buffer.
fn write_all_parts(file: &mut File, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|part| !part.is_empty())
        .map(|part| IoSlice::new(part))
        .collect();
    let mut remaining = &mut slices[..];
    while !remaining.is_empty() {
        match file.write_vectored(remaining) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut remaining, n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn is_stale_file(entry: &fs::DirEntry, now: SystemTime, max_age: Duration) -> bool {
    let Ok(meta) = entry.metadata() else {
        return false;
    };
    let Ok(modified) = meta.modified() else {
        return false;
    };
    meta.is_file() && now.duration_since(modified).is_ok_and(|age| age > max_age)
}

/// maildir(5): `/` and `:` in the host name become `\057` and `\072` (`:` starts the info part
/// of a name in cur/, `/` would make a path).
fn escape_host(hostname: &str) -> String {
    hostname.replace('/', "\\057").replace(':', "\\072")
}

/// Removal of a file that is being abandoned after an error already reported.
fn remove_quietly(path: &Path) {
    if let Err(err) = fs::remove_file(path) {
        log::warn!("spool: cannot remove {}: {err}", path.display());
    }
}

/// A fresh directory under the system temporary directory, removed with its contents on drop.
#[cfg(test)]
pub(crate) struct TestDir(pub PathBuf);

#[cfg(test)]
impl TestDir {
    pub(crate) fn new(tag: &str) -> TestDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("heloguard-test-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a test directory");
        TestDir(path)
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("list directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn open_creates_the_three_directories() {
        let dir = TestDir::new("open");
        let spool = dir.0.join("spool");
        Maildir::open(&spool, "mx").expect("open");
        for sub in ["tmp", "new", "cur"] {
            assert!(spool.join(sub).is_dir(), "{sub}");
        }
        // A second open of an existing Maildir is fine.
        Maildir::open(&spool, "mx").expect("reopen");
    }

    #[test]
    fn a_stored_message_is_in_new_byte_exact() {
        let dir = TestDir::new("store");
        let maildir = Maildir::open(&dir.0, "mx.example.net").expect("open");
        let name = maildir
            .store(&[
                b"Return-Path: <a@b>\r\n",
                b"",
                b"Subject: s\r\n\r\nbody\r\n",
            ])
            .expect("store");
        assert_eq!(names_in(&dir.0.join("new")), vec![name.clone()]);
        assert!(names_in(&dir.0.join("tmp")).is_empty());
        let stored = fs::read(dir.0.join("new").join(&name)).expect("read");
        assert_eq!(stored, b"Return-Path: <a@b>\r\nSubject: s\r\n\r\nbody\r\n");
        assert!(name.ends_with(".mx.example.net"), "{name}");
    }

    fn envelope(content: &[u8]) -> Envelope {
        crate::spool::test_envelope("Q1", content)
    }

    const FORGED: &[u8] = b"X-HELO-Check: mx.example.net; pass\r\n\
        Subject: s\r\n\
        Authentication-Results: MX.example.net;\r\n\tiprev=pass\r\n\
        Authentication-Results: other.example; iprev=fail\r\n\
        \r\n\
        X-HELO-Check: mx.example.net; body line\r\n";

    #[test]
    fn delivery_prepends_the_prefix_and_strips_forged_fields() {
        let dir = TestDir::new("deliver-prefix");
        let maildir = Maildir::open(&dir.0, "mx.example.net").expect("open");
        let env = envelope(FORGED);
        let name = maildir.deliver(&env).expect("deliver");
        let stored = fs::read(dir.0.join("new").join(name)).expect("read");
        assert!(stored.starts_with(b"Return-Path: <a@example.org>\r\n"));
        let content = &stored[maildir_prefix(&env).len()..];
        assert_eq!(
            content,
            b"\
              Subject: s\r\n\
              Authentication-Results: other.example; iprev=fail\r\n\
              \r\n\
              X-HELO-Check: mx.example.net; body line\r\n"
        );
    }

    #[test]
    fn a_batch_is_delivered_whole_and_each_message_to_its_own_file() {
        let dir = TestDir::new("deliver-batch");
        let maildir = Maildir::open(&dir.0, "mx.example.net").expect("open");
        let bodies: Vec<Vec<u8>> = (0..5)
            .map(|n| format!("Subject: {n}\r\n\r\nbody {n}\r\n").into_bytes())
            .collect();
        let envs: Vec<Envelope> = bodies.iter().map(|b| envelope(b)).collect();
        let refs: Vec<&Envelope> = envs.iter().collect();
        let names = maildir.deliver_all(&refs);
        assert_eq!(names.len(), 5);
        for (name, body) in names.iter().zip(&bodies) {
            let name = name.as_ref().expect("delivered");
            let stored = fs::read(dir.0.join("new").join(name)).expect("read");
            assert!(stored.ends_with(body), "{name}");
            assert!(stored.starts_with(b"Return-Path: "));
        }
        assert!(names_in(&dir.0.join("tmp")).is_empty());
    }

    #[test]
    fn spool_metrics_count_bytes_delivered_and_failed_steps() {
        let dir = TestDir::new("metrics");
        let metrics = std::sync::Arc::new(Metrics::new());
        let maildir = Maildir::open(&dir.0, "mx")
            .expect("open")
            .with_metrics(metrics.clone());
        maildir
            .store(&[b"Subject: s\r\n", b"\r\nbody\r\n"])
            .expect("store");
        fs::remove_dir(dir.0.join("tmp")).expect("rmdir tmp");
        File::create(dir.0.join("tmp")).expect("tmp as a file");
        let parts: [&[u8]; 1] = [b"Subject: s\r\n\r\n"];
        let _ = maildir.store_all(&[&parts, &parts]);
        let text = metrics.render();
        for line in [
            "heloguard_spool_bytes_total 20",
            "heloguard_spool_errors_total{stage=\"write\"} 2",
            "heloguard_spool_errors_total{stage=\"fsync\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
    }

    #[test]
    fn a_panic_under_the_counter_is_counted() {
        let dir = TestDir::new("panic");
        let metrics = std::sync::Arc::new(Metrics::new());
        let maildir = Maildir::open(&dir.0, "mx")
            .expect("open")
            .with_metrics(metrics.clone());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _counted = maildir.panic_counter();
            panic!("a writer job failing");
        }));
        assert!(caught.is_err());
        drop(maildir.panic_counter());
        assert!(
            metrics
                .render()
                .lines()
                .any(|l| l == "heloguard_panics_total 1")
        );
    }

    #[test]
    fn files_and_directories_are_open_to_the_group_within_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TestDir::new("modes");
        let maildir = Maildir::open(&dir.0, "mx").expect("open");
        let name = maildir.store(&[b"Subject: s\r\n\r\n"]).expect("store");
        // Read, not set: setting the umask to read it back would race the other test threads.
        let status = fs::read_to_string("/proc/self/status").expect("status");
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .expect("Umask line");
        let mode = |path: &Path| fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.0.join("new").join(name)), 0o640 & !umask);
        for sub in ["tmp", "new", "cur"] {
            assert_eq!(mode(&dir.0.join(sub)), 0o770 & !umask, "{sub}");
        }
    }

    #[test]
    fn a_failure_in_a_batch_stays_with_its_message() {
        let dir = TestDir::new("batch-failure");
        let maildir = Maildir::open(&dir.0, "mx").expect("open");
        // tmp/ replaced by a file: every create fails, and nothing reaches new/.
        fs::remove_dir(dir.0.join("tmp")).expect("rmdir tmp");
        File::create(dir.0.join("tmp")).expect("tmp as a file");
        let parts: [&[u8]; 1] = [b"Subject: s\r\n\r\n"];
        let results = maildir.store_all(&[&parts, &parts]);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(SpoolError::Create { .. })))
        );
        assert!(names_in(&dir.0.join("new")).is_empty());
    }

    #[test]
    fn a_delivered_file_is_the_prefix_then_the_stripped_message() {
        let dir = TestDir::new("deliver");
        let maildir = Maildir::open(&dir.0, "mx.example.net").expect("open");
        let env = envelope(FORGED);
        let name = maildir.deliver(&env).expect("deliver");
        assert_eq!(names_in(&dir.0.join("new")), vec![name.clone()]);
        let stored = fs::read(dir.0.join("new").join(name)).expect("read");
        let mut want = maildir_prefix(&env);
        want.extend_from_slice(&crate::message::header::strip_own_fields(
            FORGED,
            "mx.example.net",
        ));
        assert_eq!(stored, want);
        assert!(stored.starts_with(b"Return-Path: <a@example.org>\r\nX-Envelope-To: <b@example.net>\r\nReceived: from mail.example.org (unknown [192.0.2.7])\r\n"));
    }

    /// `content` through the session's builder, spilling into `maildir`'s tmp/.
    fn spilled_envelope(maildir: &std::sync::Arc<Maildir>, content: &[u8]) -> Envelope {
        use crate::message::content::{ContentBuilder, SpillStore};
        let store: std::sync::Arc<dyn SpillStore> = maildir.clone();
        let mut builder = ContentBuilder::new("mx.example.net", Some(store));
        for piece in content.chunks(16 * 1024) {
            builder.push(piece);
        }
        let mut env = envelope(b"");
        env.content = builder.finish().expect("content");
        env
    }

    #[test]
    fn a_spilled_message_is_stored_as_the_whole_path_would_store_it() {
        let dir = TestDir::new("deliver-spilled");
        let maildir = std::sync::Arc::new(Maildir::open(&dir.0, "mx.example.net").expect("open"));
        let mut whole = FORGED.to_vec();
        whole.extend(b"a body line, repeated to pass the memory part\r\n".repeat(5000));
        let env = spilled_envelope(&maildir, &whole);
        assert!(env.content.spill.is_some());
        assert_eq!(names_in(&dir.0.join("tmp")).len(), 1, "the spill");
        let name = maildir.deliver(&env).expect("deliver");
        let stored = fs::read(dir.0.join("new").join(name)).expect("read");
        // What the whole-message path wrote: the prefix, then the message filtered at once.
        let mut want = maildir_prefix(&env);
        want.extend_from_slice(&crate::message::header::strip_own_fields(
            &whole,
            "mx.example.net",
        ));
        assert_eq!(stored, want);
        drop(env);
        assert!(names_in(&dir.0.join("tmp")).is_empty());
    }

    #[test]
    fn a_message_that_would_go_below_the_minimum_free_is_refused() {
        let dir = TestDir::new("deliver-min-free");
        let maildir = Maildir::open(&dir.0, "mx.example.net")
            .expect("open")
            .with_min_free_mb(u64::MAX / (1024 * 1024));
        let env = envelope(b"Subject: s\r\n\r\nbody\r\n");
        assert!(matches!(
            maildir.deliver(&env),
            Err(SpoolError::InsufficientSpace { .. })
        ));
        assert!(names_in(&dir.0.join("tmp")).is_empty());
        assert!(names_in(&dir.0.join("new")).is_empty());
    }

    #[test]
    fn many_slices_are_all_written() {
        let dir = TestDir::new("slices");
        let maildir = Maildir::open(&dir.0, "mx").expect("open");
        // More slices than IOV_MAX (1024) forces several vectored writes.
        let parts: Vec<Vec<u8>> = (0..3000).map(|i| format!("{i}\n").into_bytes()).collect();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let name = maildir.store(&refs).expect("store");
        let stored = fs::read(dir.0.join("new").join(name)).expect("read");
        assert_eq!(stored, parts.concat());
    }

    #[test]
    fn unique_names_follow_maildir_5_and_escape_the_host() {
        let dir = TestDir::new("names");
        let maildir = Maildir::open(&dir.0, "a/b:c").expect("open");
        let first = maildir.unique_name();
        let second = maildir.unique_name();
        assert_ne!(first, second);
        assert!(first.ends_with(".a\\057b\\072c"), "{first}");
        let pid = format!("P{}Q", std::process::id());
        assert!(first.contains(&pid), "{first}");
        let (secs, rest) = first.split_once(".M").expect("SECS.M");
        assert!(secs.bytes().all(|b| b.is_ascii_digit()), "{first}");
        assert!(rest.starts_with(|c: char| c.is_ascii_digit()), "{first}");
    }

    #[test]
    fn open_removes_old_tmp_files_but_not_fresh_ones() {
        let dir = TestDir::new("stale");
        Maildir::open(&dir.0, "mx").expect("open");
        let old = dir.0.join("tmp").join("old");
        let fresh = dir.0.join("tmp").join("fresh");
        let file = File::create(&old).expect("create old");
        let long_ago = SystemTime::now() - TMP_MAX_AGE - Duration::from_secs(60);
        file.set_modified(long_ago).expect("set mtime");
        drop(file);
        File::create(&fresh).expect("create fresh");
        Maildir::open(&dir.0, "mx").expect("reopen");
        assert_eq!(names_in(&dir.0.join("tmp")), vec!["fresh".to_owned()]);
    }

    #[test]
    fn a_failed_store_leaves_nothing_in_new() {
        let dir = TestDir::new("fail");
        let maildir = Maildir::open(&dir.0, "mx").expect("open");
        // Tests may run as root, for whom permissions stop nothing: replace tmp/ by a file.
        let tmp = dir.0.join("tmp");
        fs::remove_dir(&tmp).expect("remove tmp");
        File::create(&tmp).expect("tmp as a file");
        let err = maildir
            .store(&[b"Subject: s\r\n\r\n"])
            .expect_err("store must fail");
        assert!(matches!(err, SpoolError::Create { .. }), "{err}");
        assert!(names_in(&dir.0.join("new")).is_empty());
    }

    #[test]
    fn a_failed_rename_removes_the_tmp_file() {
        let dir = TestDir::new("rename");
        let maildir = Maildir::open(&dir.0, "mx").expect("open");
        let new = dir.0.join("new");
        fs::remove_dir(&new).expect("remove new");
        File::create(&new).expect("new as a file");
        let err = maildir
            .store(&[b"Subject: s\r\n\r\n"])
            .expect_err("store must fail");
        assert!(matches!(err, SpoolError::Rename { .. }), "{err}");
        assert!(names_in(&dir.0.join("tmp")).is_empty());
    }

    #[test]
    fn the_parent_of_a_one_component_relative_path_is_the_current_directory() {
        assert_eq!(parent_of(Path::new("spool")), Path::new("."));
        assert_eq!(parent_of(Path::new("/var/spool")), Path::new("/var"));
        assert_eq!(parent_of(Path::new("a/b")), Path::new("a"));
    }

    #[test]
    fn free_space_of_an_existing_directory() {
        let dir = TestDir::new("df");
        free_space_mb(&dir.0).expect("statvfs");
        assert!(free_space_mb(&dir.0.join("missing")).is_err());
    }
}
