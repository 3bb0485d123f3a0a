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
    let mut body = (values.len() as u16).to_be_bytes().to_vec();
    for value in values {
        match value {
            Some(v) => {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v);
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    body
}
