//! The session state machine on arbitrary byte streams split into arbitrary reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    heloguard::fuzzing::session_input(data);
});
