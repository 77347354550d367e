//! spool envelope
