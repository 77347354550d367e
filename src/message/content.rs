//! The content of one message in maildir mode, built as it arrives (SPEC "Memory": message
//! content does not wait whole in memory).
//!
//! `ContentBuilder` runs the decoded content through the `HeaderFilter` and keeps it in memory
//! while it is small (`MEMORY_PART`); past that, everything goes to a `ContentSpill`, a file in
//! the spool's tmp/ that the spool's `SpillStore` makes. The session stays sans-I/O in the sense
//! that matters: it never names a file, it only appends to what the server gave it, and the
//! spill's owner decides what dropping it means (the spool's removes the file, so a
//! transaction that breaks, is refused or is reset leaves nothing behind).
//!
//! The result, `MessageContent`, is what the spool writes after the trace fields: the memory
//! part, then the spill's bytes.

use std::fmt;
use std::fs::File;
use std::io;
use std::io::Write;
use std::sync::Arc;

use crate::message::header::HeaderFilter;

/// Most octets of one message's content held in memory before it goes to a spill. Small
/// messages (most mail) never touch a spill; with 1,000 sessions this is 32 MiB at most.
pub const MEMORY_PART: usize = 32 * 1024;

/// Content that did not fit in memory, appended in order as it arrives.
pub trait ContentSpill: Send + fmt::Debug {
    /// Appends `bytes` (buffered writes are fine: nothing is durable before the spool says so).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Every octet appended is handed on (buffers flushed), so that `copy_to` sees it all.
    fn finish(&mut self) -> io::Result<()>;
    /// Octets appended so far.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes every octet appended, in order, at `to`'s current offset; returns how many.
    fn copy_to(&self, to: &File) -> io::Result<u64>;
}

/// Makes a `ContentSpill` for a message that outgrows `MEMORY_PART`.
pub trait SpillStore: Send + Sync + fmt::Debug {
    fn create(&self) -> io::Result<Box<dyn ContentSpill>>;
}

/// The content of an accepted message, header already filtered: `memory`, then the spill.
#[derive(Debug, Default)]
pub struct MessageContent {
    pub memory: Vec<u8>,
    pub spill: Option<Box<dyn ContentSpill>>,
}

impl MessageContent {
    /// Content held wholly in memory.
    pub fn in_memory(memory: Vec<u8>) -> Self {
        Self {
            memory,
            spill: None,
        }
    }

    /// Octets in all.
    pub fn len(&self) -> u64 {
        self.memory.len() as u64 + self.spill.as_ref().map_or(0, |spill| spill.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All of it, memory part and spill, read back through a temporary file.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> Vec<u8> {
        static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut all = self.memory.clone();
        if let Some(spill) = &self.spill {
            let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("heloguard-content-{}-{n}", std::process::id()));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("temporary file");
            spill.copy_to(&file).expect("copy the spill");
            all.extend(std::fs::read(&path).expect("read back"));
            let _ = std::fs::remove_file(&path);
        }
        all
    }
}

/// Why a message's content cannot be stored.
#[derive(Debug)]
pub enum ContentError {
    /// More than `MAX_RECEIVED_FIELDS` Received fields (554 5.4.6).
    Loop,
    /// Creating or writing the spill failed (451 4.3.0).
    Spill(io::Error),
}

impl fmt::Display for ContentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentError::Loop => f.write_str("too many Received fields"),
            ContentError::Spill(err) => write!(f, "cannot spill message content: {err}"),
        }
    }
}

impl std::error::Error for ContentError {}

/// One message's content on its way in; see the module docs.
#[derive(Debug)]
pub struct ContentBuilder {
    filter: HeaderFilter,
    memory: Vec<u8>,
    spill: Option<Box<dyn ContentSpill>>,
    /// None: everything stays in memory (callers with no spool, tests).
    store: Option<Arc<dyn SpillStore>>,
    /// The first spill error; from then on content is only read and dropped.
    failed: Option<io::Error>,
    looped: bool,
}

impl ContentBuilder {
    /// A builder that removes the fields claiming `hostname` and spills through `store`.
    pub fn new(hostname: &str, store: Option<Arc<dyn SpillStore>>) -> Self {
        Self {
            filter: HeaderFilter::new(hostname),
            memory: Vec::new(),
            spill: None,
            store,
            failed: None,
            looped: false,
        }
    }

    /// Takes the next decoded content (dot-unstuffed, CRLF lines).
    pub fn push(&mut self, content: &[u8]) {
        if self.stopped() || content.is_empty() {
            return;
        }
        if self.filter.in_body() {
            self.store(content);
            return;
        }
        let mut kept = Vec::new();
        let body_from = self.filter.feed(content, &mut kept);
        if self.filter.loop_detected() {
            self.stop_looped();
            return;
        }
        self.store(&kept);
        self.store(&content[body_from..]);
    }

    /// The message is complete.
    pub fn finish(mut self) -> Result<MessageContent, ContentError> {
        if !self.stopped() {
            let mut tail = Vec::new();
            self.filter.finish(&mut tail);
            if self.filter.loop_detected() {
                self.stop_looped();
            } else {
                self.store(&tail);
            }
        }
        if self.looped {
            return Err(ContentError::Loop);
        }
        if let Some(err) = self.failed.take() {
            return Err(ContentError::Spill(err));
        }
        if let Some(spill) = self.spill.as_mut()
            && let Err(err) = spill.finish()
        {
            return Err(ContentError::Spill(err));
        }
        Ok(MessageContent {
            memory: std::mem::take(&mut self.memory),
            spill: self.spill.take(),
        })
    }

    /// Octets held in memory: the memory part and the field the filter holds.
    pub fn buffered(&self) -> usize {
        self.memory.len() + self.filter.held()
    }

    /// A spill exists: the content went past `MEMORY_PART`.
    pub fn spilled(&self) -> bool {
        self.spill.is_some()
    }

    fn stopped(&self) -> bool {
        self.looped || self.failed.is_some()
    }

    /// A looping message is refused at its end: nothing more of it is kept.
    fn stop_looped(&mut self) {
        self.looped = true;
        self.drop_content();
    }

    fn drop_content(&mut self) {
        self.memory = Vec::new();
        self.spill = None;
    }

    fn store(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.stopped() {
            return;
        }
        let spill_now = self.spill.is_none() && self.memory.len() + bytes.len() > MEMORY_PART;
        let result = match (&mut self.spill, &self.store) {
            (Some(spill), _) => spill.append(bytes),
            (None, Some(store)) if spill_now => {
                // The memory part moves to the spill too, so that a large message holds no
                // memory at all while it arrives, however long it takes.
                let created = store.create().and_then(|mut spill| {
                    spill.append(&self.memory)?;
                    spill.append(bytes)?;
                    Ok(spill)
                });
                created.map(|spill| {
                    self.memory = Vec::new();
                    self.spill = Some(spill);
                })
            }
            (None, _) => {
                self.memory.extend_from_slice(bytes);
                Ok(())
            }
        };
        if let Err(err) = result {
            self.failed = Some(err);
            self.drop_content();
        }
    }
}

/// A spill in memory, for tests and for callers without a spool.
#[derive(Debug, Default)]
pub struct MemorySpill {
    bytes: Vec<u8>,
}

impl ContentSpill for MemorySpill {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn copy_to(&self, mut to: &File) -> io::Result<u64> {
        to.write_all(&self.bytes)?;
        Ok(self.bytes.len() as u64)
    }
}

/// Makes `MemorySpill`s.
#[derive(Debug, Default)]
pub struct MemorySpillStore;

impl SpillStore for MemorySpillStore {
    fn create(&self) -> io::Result<Box<dyn ContentSpill>> {
        Ok(Box::new(MemorySpill::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::header::strip_own_fields;

    /// A store whose spills fail after `fail_after` octets.
    #[derive(Debug)]
    struct FailingStore {
        fail_after: u64,
    }

    #[derive(Debug)]
    struct FailingSpill {
        len: u64,
        fail_after: u64,
    }

    impl ContentSpill for FailingSpill {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            if self.len + bytes.len() as u64 > self.fail_after {
                return Err(io::Error::other("disk full"));
            }
            self.len += bytes.len() as u64;
            Ok(())
        }
        fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> u64 {
            self.len
        }
        fn copy_to(&self, _to: &File) -> io::Result<u64> {
            Ok(0)
        }
    }

    impl SpillStore for FailingStore {
        fn create(&self) -> io::Result<Box<dyn ContentSpill>> {
            Ok(Box::new(FailingSpill {
                len: 0,
                fail_after: self.fail_after,
            }))
        }
    }

    fn message(body_lines: usize) -> Vec<u8> {
        let mut m = b"X-HELO-Check: mx.test; pass\r\nSubject: hi\r\n\r\n".to_vec();
        for n in 0..body_lines {
            m.extend(format!("line {n} of the body, long enough to matter\r\n").as_bytes());
        }
        m
    }

    #[test]
    fn content_in_any_chunks_equals_the_whole_message_filtered() {
        for lines in [0, 10, 5000] {
            let whole = message(lines);
            let want = strip_own_fields(&whole, "mx.test");
            for chunk in [1, 7, 1000, 16 * 1024, whole.len().max(1)] {
                let mut b = ContentBuilder::new("mx.test", Some(Arc::new(MemorySpillStore)));
                for piece in whole.chunks(chunk) {
                    b.push(piece);
                    assert!(b.buffered() <= MEMORY_PART + chunk);
                }
                let content = b.finish().expect("content");
                assert_eq!(content.spill.is_some(), want.len() > MEMORY_PART);
                assert_eq!(content.len(), want.len() as u64);
                assert_eq!(content.bytes(), want, "{lines} lines in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn a_spilled_message_holds_no_memory_part() {
        let whole = message(5000);
        let mut b = ContentBuilder::new("mx.test", Some(Arc::new(MemorySpillStore)));
        for piece in whole.chunks(4096) {
            b.push(piece);
        }
        assert!(b.spilled());
        assert_eq!(b.buffered(), 0);
    }

    #[test]
    fn without_a_store_everything_stays_in_memory() {
        let whole = message(5000);
        let mut b = ContentBuilder::new("mx.test", None);
        b.push(&whole);
        let content = b.finish().expect("content");
        assert!(content.spill.is_none());
        assert_eq!(content.memory, strip_own_fields(&whole, "mx.test"));
    }

    #[test]
    fn a_spill_error_fails_the_message_and_drops_the_rest() {
        let whole = message(5000);
        let mut b = ContentBuilder::new("mx.test", Some(Arc::new(FailingStore { fail_after: 1 })));
        for piece in whole.chunks(4096) {
            b.push(piece);
        }
        assert_eq!(b.buffered(), 0);
        assert!(matches!(b.finish(), Err(ContentError::Spill(_))));
    }

    #[test]
    fn a_loop_is_found_over_the_whole_header() {
        let mut whole = b"Received: x\r\n".repeat(101);
        whole.extend_from_slice(b"\r\nbody\r\n");
        let mut b = ContentBuilder::new("mx.test", Some(Arc::new(MemorySpillStore)));
        for piece in whole.chunks(5) {
            b.push(piece);
        }
        assert!(matches!(b.finish(), Err(ContentError::Loop)));

        let mut whole = b"Received: x\r\n".repeat(100);
        whole.extend_from_slice(b"\r\nbody\r\n");
        let mut b = ContentBuilder::new("mx.test", None);
        b.push(&whole);
        assert!(b.finish().is_ok());
    }
}
