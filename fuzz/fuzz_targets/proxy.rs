//! The PROXY protocol header parser on arbitrary bytes read in arbitrary cuts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    heloguard::fuzzing::proxy_input(data);
});
