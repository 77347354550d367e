//! The X-HELO-Check and Authentication-Results (RFC 8601 iprev) field values.
