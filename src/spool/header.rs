//! spool header
