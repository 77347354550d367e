//! The I/O edge: listeners, the mio event loop, connections, workers, TLS.
