//! The header filter on an arbitrary message split into arbitrary chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    heloguard::fuzzing::header_input(data);
});
