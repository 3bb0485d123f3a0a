//! What a recording directory holds, for tests that look for secrets in it.

use std::path::Path;

use portcullis::record::segment::Segment;

/// Every file under `dir`, and every zstd block of its segments decompressed.
pub fn everything_stored(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            out.push(std::fs::read(&path).unwrap());
            if let Ok(seg) = Segment::open(&path) {
                let (blocks, _) = seg.blocks();
                for b in blocks.iter().filter(|b| !b.is_checkpoint) {
                    out.extend(b.records().unwrap());
                }
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
