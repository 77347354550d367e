//! The resolver thread.
