//! Helpers shared by unit tests.

/// A seeded xorshift generator: `next(n)` is in `0..n`. The differential tests draw their texts
/// from it, so a failure reproduces from the seed alone.
pub(crate) fn xorshift(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed;
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    }
}

/// A DataRow body: the column count, then each value with its length, `None` as SQL NULL (-1).
pub(crate) fn data_row_body(values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut message = Vec::new();
    crate::protocol::postgres::messages::encode_data_row(values, &mut message);
    message.split_off(5)
}
