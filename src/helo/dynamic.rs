//! Generic (dynamic pool) host name heuristics.
