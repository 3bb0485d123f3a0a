#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    portcullis::protocol::postgres::fuzzing::housekeeping(data)
});
