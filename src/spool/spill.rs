//! Spill files: the content of messages still arriving, past what a session holds in memory
//! (SPEC "Memory"), in the Maildir's tmp/.
//!
//! Written with plain buffered writes from the worker thread that runs the session: nothing is
//! durable before the spool writer copies the spill into the message's own tmp/ file and
//! fsyncs that. A spill is removed when it is dropped, which is when its transaction ends in
//! any way (stored, refused, reset, or the connection gone), so tmp/ holds only messages in
//! flight. A process killed meanwhile leaves its spills to `Maildir::remove_stale_tmp`.

use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::BufWriter;
use std::io::Read;
use std::io::Seek;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::message::content::{ContentSpill, SpillStore};
use crate::spool::maildir::Maildir;

/// Mail is the spool owner's and its group's, as in `maildir`.
const FILE_MODE: u32 = 0o640;

/// Write buffer of one spill: decoded content arrives in pieces of about a read each.
const WRITE_BUFFER: usize = 8 * 1024;

/// One spill file in tmp/; removed on drop.
#[derive(Debug)]
pub(crate) struct TmpSpill {
    file: BufWriter<File>,
    path: PathBuf,
    len: u64,
}

impl SpillStore for Maildir {
    fn create(&self) -> io::Result<Box<dyn ContentSpill>> {
        let path = self.tmp_dir().join(self.unique_name());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)?;
        Ok(Box::new(TmpSpill {
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            path,
            len: 0,
        }))
    }
}

impl ContentSpill for TmpSpill {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn copy_to(&self, to: &File) -> io::Result<u64> {
        let mut from = self.file.get_ref();
        from.rewind()?;
        // Between two files std uses copy_file_range: the content never passes through here.
        let mut to = to;
        io::copy(&mut from.take(self.len), &mut to)
    }
}

impl Drop for TmpSpill {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_file(&self.path)
            && err.kind() != io::ErrorKind::NotFound
        {
            log::warn!("spool: cannot remove {}: {err}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_names(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("tmp"))
            .expect("tmp")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_spill_is_a_file_in_tmp_until_dropped_and_copies_whole() {
        let dir = std::env::temp_dir().join(format!("heloguard-spill-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let maildir = Maildir::open(&dir, "mx.test").expect("open");
        let mut spill = maildir.create().expect("create");
        assert_eq!(tmp_names(&dir).len(), 1);
        let piece = b"0123456789abcdef\r\n".repeat(1000);
        for _ in 0..10 {
            spill.append(&piece).expect("append");
        }
        spill.finish().expect("finish");
        assert_eq!(spill.len(), 10 * piece.len() as u64);

        let copy_path = dir.join("copy");
        let copy = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&copy_path)
            .expect("copy file");
        (&copy).write_all(b"prefix\r\n").expect("prefix");
        assert_eq!(spill.copy_to(&copy).expect("copy"), spill.len());
        let mut got = Vec::new();
        File::open(&copy_path)
            .expect("open copy")
            .read_to_end(&mut got)
            .expect("read");
        assert!(got.starts_with(b"prefix\r\n"));
        assert_eq!(got.len(), 8 + 10 * piece.len());
        assert_eq!(&got[8..8 + piece.len()], &piece[..]);

        drop(spill);
        assert!(tmp_names(&dir).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
