//! spool maildir
