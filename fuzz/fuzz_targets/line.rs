//! The command line reader and parser on arbitrary bytes split into arbitrary reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    heloguard::fuzzing::line_input(data);
});
