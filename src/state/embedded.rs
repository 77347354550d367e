//! The embedded state store: a map in the state thread's memory, every entry with its own
//! expiry, at most HELOGUARD_STATE_MAX_ENTRIES entries (past it, those nearest expiry go
//! first, as Redis's `volatile-ttl`), saved to HELOGUARD_STATE_FILE every minute when it
//! changed and when the thread stops, loaded at start.
//!
//! The file is text, one entry a line after a version line, keys and names in hex so that no
//! byte of them can break the format:
//!
//! ```text
//! heloguard-state 1
//! g EXPIRES FIRST_SEEN PASSED LAST_USE HEX(KEY)
//! h EXPIRES HEX(CLIENT) HEX(NAME)=SEEN ...
//! ```
//!
//! Saving writes a temporary file beside it, fsyncs it, renames it over the old one and
//! fsyncs the directory: a crash leaves the old file or the new one, never half of one. A
//! missing file is an empty store; a file that does not parse is logged and ignored (the
//! store starts empty): greylisting state is worth less than starting.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};

use super::logic::{self, CHURN_WINDOW_MS, GreyRecord};
use super::{StateBackend, StateQuery, StateReply, StoreError, now_millis};
use crate::greylist::GreylistTimes;
use crate::helo::sender::ChurnOutcome;

const VERSION_LINE: &str = "heloguard-state 1";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    Grey(GreyRecord),
    /// (name, last seen), for helo_churn.
    Names(Vec<(String, u64)>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    value: Value,
    expires: u64,
}

/// A key, held once for the map and the expiry index alike.
type Key = Arc<str>;

/// Triplets and HELO histories in one map: a greylist key starts with `g`, a history's with
/// `h`, so the two never collide.
#[derive(Debug)]
pub(crate) struct EmbeddedStore {
    entries: HashMap<Key, Entry>,
    /// (expires, key) for every entry: expiry and eviction take from the front.
    by_expiry: BTreeSet<(u64, Key)>,
    max_entries: usize,
    path: PathBuf,
    times: GreylistTimes,
    /// Changed since the last save.
    dirty: bool,
}

impl EmbeddedStore {
    /// The store as saved at `path`; empty when there is no file or it does not parse.
    pub(crate) fn load(path: PathBuf, max_entries: usize, times: GreylistTimes) -> Self {
        let mut store = Self {
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
            max_entries: max_entries.max(1),
            path,
            times,
            dirty: false,
        };
        let now = now_millis();
        match File::open(&store.path) {
            Ok(file) => match read_entries(BufReader::new(file)) {
                Ok(entries) => {
                    for (key, entry) in entries {
                        if entry.expires > now {
                            store.put(key, entry);
                        }
                    }
                    info!(
                        "state store: {} entries loaded from {}",
                        store.entries.len(),
                        store.path.display()
                    );
                }
                Err(e) => warn!(
                    "state store: {} is unreadable and ignored: {e}",
                    store.path.display()
                ),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                "state store: cannot open {} (starting empty): {e}",
                store.path.display()
            ),
        }
        store.dirty = false;
        store
    }

    /// Entries held now (expired ones included until they are reached).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&mut self, key: &str, now: u64) -> Option<&Entry> {
        let expired = self.entries.get(key)?.expires <= now;
        if expired {
            self.remove(key);
            return None;
        }
        self.entries.get(key)
    }

    fn remove(&mut self, key: &str) {
        if let Some((key, old)) = self.entries.remove_entry(key) {
            self.by_expiry.remove(&(old.expires, key));
            self.dirty = true;
        }
    }

    fn put(&mut self, key: String, entry: Entry) {
        let key: Key = match self.entries.get_key_value(key.as_str()) {
            Some((held, old)) => {
                let held = held.clone();
                self.by_expiry.remove(&(old.expires, held.clone()));
                held
            }
            None => Key::from(key),
        };
        self.by_expiry.insert((entry.expires, key.clone()));
        self.entries.insert(key, entry);
        self.dirty = true;
        while self.entries.len() > self.max_entries {
            let Some((_, key)) = self.by_expiry.pop_first() else {
                break;
            };
            self.entries.remove(&*key);
        }
    }

    /// Drops every entry that has expired.
    fn expire(&mut self, now: u64) {
        while let Some((expires, _)) = self.by_expiry.first()
            && *expires <= now
        {
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.entries.remove(&*key);
                self.dirty = true;
            }
        }
    }

    fn greylist(&mut self, key: String, now: u64) -> StateReply {
        let record = match self.get(&key, now).map(|e| &e.value) {
            Some(Value::Grey(record)) => Some(*record),
            _ => None,
        };
        let step = logic::greylist_step(record, now, &self.times);
        if let Some((record, keep_for)) = step.keep {
            self.put(
                key,
                Entry {
                    value: Value::Grey(record),
                    expires: now.saturating_add(keep_for),
                },
            );
        }
        StateReply::Greylist(step.outcome)
    }

    fn churn(&mut self, key: String, name: &str, now: u64) -> u32 {
        let mut history = match self.get(&key, now).map(|e| &e.value) {
            Some(Value::Names(names)) => names.clone(),
            _ => Vec::new(),
        };
        let count = logic::record_helo(&mut history, name, now);
        self.put(
            key,
            Entry {
                value: Value::Names(history),
                expires: now.saturating_add(CHURN_WINDOW_MS),
            },
        );
        count
    }

    /// Answers one question at `now`.
    pub(crate) fn answer_one(&mut self, query: &StateQuery, now: u64) -> StateReply {
        match query {
            StateQuery::Greylist(triplet) => {
                self.greylist(format!("g{}", logic::triplet_key(triplet)), now)
            }
            StateQuery::Churn { client, name } => StateReply::Churn {
                name: name.clone(),
                outcome: ChurnOutcome::DistinctNames(self.churn(format!("h{client}"), name, now)),
            },
        }
    }

    /// Writes the store to its file atomically.
    pub(crate) fn save(&mut self) -> io::Result<()> {
        self.expire(now_millis());
        let tmp = tmp_path(&self.path);
        let result = write_entries(&tmp, &self.entries).and_then(|()| {
            std::fs::rename(&tmp, &self.path)?;
            sync_dir(&self.path)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            self.dirty = false;
        }
        result
    }

    fn save_logged(&mut self) {
        if let Err(e) = self.save() {
            warn!("state store: cannot save to {}: {e}", self.path.display());
        }
    }
}

impl StateBackend for EmbeddedStore {
    fn answer(&mut self, queries: &[StateQuery]) -> Result<Vec<StateReply>, StoreError> {
        let now = now_millis();
        Ok(queries.iter().map(|q| self.answer_one(q, now)).collect())
    }

    fn tick(&mut self) {
        self.expire(now_millis());
        if self.dirty {
            self.save_logged();
        }
    }

    fn close(&mut self) {
        if self.dirty {
            self.save_logged();
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn write_entries(tmp: &Path, entries: &HashMap<Key, Entry>) -> io::Result<()> {
    let file = File::create(tmp)?;
    let mut out = BufWriter::new(file);
    writeln!(out, "{VERSION_LINE}")?;
    let mut line = String::new();
    for (key, entry) in entries {
        line.clear();
        match &entry.value {
            Value::Grey(r) => {
                let _ = write!(
                    line,
                    "g {} {} {} {} {}",
                    entry.expires,
                    r.first_seen,
                    u8::from(r.passed),
                    r.last_use,
                    hex(key)
                );
            }
            Value::Names(names) => {
                let _ = write!(line, "h {} {}", entry.expires, hex(key));
                for (name, seen) in names {
                    let _ = write!(line, " {}={seen}", hex(name));
                }
            }
        }
        writeln!(out, "{line}")?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Why a saved file was not taken.
#[derive(Debug)]
enum LoadError {
    Io(io::Error),
    Version,
    Line(usize),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Io(e) => write!(f, "{e}"),
            LoadError::Version => write!(f, "its first line is not `{VERSION_LINE}`"),
            LoadError::Line(n) => write!(f, "line {n} does not parse"),
        }
    }
}

fn read_entries(reader: impl BufRead) -> Result<Vec<(String, Entry)>, LoadError> {
    let mut lines = reader.lines();
    match lines.next() {
        Some(Ok(first)) if first == VERSION_LINE => {}
        Some(Err(e)) => return Err(LoadError::Io(e)),
        _ => return Err(LoadError::Version),
    }
    let mut entries = Vec::new();
    for (n, line) in lines.enumerate() {
        let line = line.map_err(LoadError::Io)?;
        entries.push(parse_line(&line).ok_or(LoadError::Line(n + 2))?);
    }
    Ok(entries)
}

fn parse_line(line: &str) -> Option<(String, Entry)> {
    let mut fields = line.split(' ');
    let kind = fields.next()?;
    let expires = fields.next()?.parse().ok()?;
    match kind {
        "g" => {
            let first_seen = fields.next()?.parse().ok()?;
            let passed = match fields.next()? {
                "0" => false,
                "1" => true,
                _ => return None,
            };
            let last_use = fields.next()?.parse().ok()?;
            let key = unhex(fields.next()?)?;
            if fields.next().is_some() || !key.starts_with('g') {
                return None;
            }
            let record = GreyRecord {
                first_seen,
                passed,
                last_use,
            };
            Some((
                key,
                Entry {
                    value: Value::Grey(record),
                    expires,
                },
            ))
        }
        "h" => {
            let key = unhex(fields.next()?)?;
            if !key.starts_with('h') {
                return None;
            }
            let names = fields
                .map(|f| {
                    let (name, seen) = f.split_once('=')?;
                    Some((unhex(name)?, seen.parse().ok()?))
                })
                .collect::<Option<Vec<_>>>()?;
            Some((
                key,
                Entry {
                    value: Value::Names(names),
                    expires,
                },
            ))
        }
        _ => None,
    }
}

fn hex(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for b in text.bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::greylist::{GreylistClient, GreylistOutcome, Triplet};
    use std::time::Duration;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("heloguard-embedded-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    fn triplet(n: usize) -> StateQuery {
        StateQuery::Greylist(Triplet {
            client: GreylistClient::Domain("example.net".into()),
            sender: format!("s{n}@example.net"),
            recipient: "r@example.org".into(),
        })
    }

    fn times() -> GreylistTimes {
        GreylistTimes {
            delay: Duration::from_secs(2),
            ..GreylistTimes::default()
        }
    }

    #[test]
    fn triplets_and_histories_survive_a_save_and_load() {
        let dir = scratch("roundtrip");
        let path = dir.join("state");
        let mut store = EmbeddedStore::load(path.clone(), 100, times());
        let now = now_millis();
        assert!(matches!(
            store.answer_one(&triplet(1), now),
            StateReply::Greylist(GreylistOutcome::New { .. })
        ));
        let churn = StateQuery::Churn {
            client: "192.0.2.1".into(),
            name: "a b\nc".into(),
        };
        store.answer_one(&churn, now);
        store.save().expect("save");
        assert!(!tmp_path(&path).exists());

        let mut again = EmbeddedStore::load(path, 100, times());
        assert_eq!(again.len(), 2);
        assert!(matches!(
            again.answer_one(&triplet(1), now + 1),
            StateReply::Greylist(GreylistOutcome::Early { .. })
        ));
        assert_eq!(
            again.answer_one(&churn, now + 2),
            StateReply::Churn {
                name: "a b\nc".into(),
                outcome: ChurnOutcome::DistinctNames(1)
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_or_corrupt_file_is_an_empty_store() {
        let dir = scratch("corrupt");
        let path = dir.join("state");
        assert_eq!(EmbeddedStore::load(path.clone(), 10, times()).len(), 0);
        std::fs::write(&path, "heloguard-state 1\ng 1 2 x\n").expect("write");
        assert_eq!(EmbeddedStore::load(path.clone(), 10, times()).len(), 0);
        std::fs::write(&path, "something else\n").expect("write");
        assert_eq!(EmbeddedStore::load(path, 10, times()).len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_store_keeps_at_most_max_entries_evicting_nearest_expiry_first() {
        let dir = scratch("bounded");
        let mut store = EmbeddedStore::load(dir.join("state"), 10, times());
        let now = now_millis();
        // A passed triplet is kept for the pass period, longer than the retry window of new
        // ones: a flood of new triplets evicts new triplets, not it.
        store.answer_one(&triplet(0), now);
        store.answer_one(&triplet(0), now + 2_000);
        for n in 1..1000 {
            store.answer_one(&triplet(n), now + 3_000 + n as u64);
        }
        assert_eq!(store.len(), 10);
        assert_eq!(
            store.answer_one(&triplet(0), now + 5_000_000),
            StateReply::Greylist(GreylistOutcome::Known)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn expired_entries_go() {
        let dir = scratch("expiry");
        let mut store = EmbeddedStore::load(dir.join("state"), 100, times());
        let now = now_millis();
        store.answer_one(&triplet(1), now);
        store.expire(now + logic::millis(times().retry) + 1);
        assert_eq!(store.len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex("a\n b\u{e9}")).as_deref(), Some("a\n b\u{e9}"));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
