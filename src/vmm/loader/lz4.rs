//! LZ4 in the legacy frame Linux compresses its kernel with (`CONFIG_KERNEL_LZ4`: the
//! `lz4 -l` format): the magic 0x184c2102, then blocks, each a little-endian u32 length and an
//! LZ4 block of at most 8 MiB of output. A bzImage's payload ends with the decompressed size
//! (a u32 the kernel's build appends), which bounds the output.
//!
//! An LZ4 block is a run of sequences: a token (high nibble: literal count, low nibble: match
//! length − 4, 15 meaning "more bytes follow, each added until one is below 255"), the
//! literals, a 2-byte little-endian match offset back into the output and the match itself
//! (which may overlap what it copies: an offset of 1 repeats a byte). The last sequence has
//! literals only. Every length and offset is checked against the input and the output: a
//! corrupt payload is an error naming its input offset, never a panic or an over-long output.

const LEGACY_MAGIC: u32 = 0x184c_2102;
/// The largest block the legacy format produces.
const LEGACY_BLOCK_MAX: usize = 8 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Lz4Error {
    #[error("not LZ4 legacy frame (no magic 0x184c2102 at its start)")]
    NotLegacy,
    #[error("LZ4 data ends inside a block at input offset {0:#x}")]
    Truncated(usize),
    #[error("LZ4 match at input offset {at:#x} reaches {offset} bytes back, before the start of its block")]
    BadOffset { at: usize, offset: usize },
    #[error("LZ4 output passes {limit} bytes (at input offset {at:#x}): the payload does not match its size")]
    TooLong { at: usize, limit: usize },
}

/// Whether `input` starts like an LZ4 legacy frame.
pub fn is_legacy(input: &[u8]) -> bool {
    input.len() >= 4 && u32::from_le_bytes([input[0], input[1], input[2], input[3]]) == LEGACY_MAGIC
}

/// What stopped [`decompress_legacy_blocks`]: the data, or the consumer of its blocks.
#[derive(Debug)]
pub enum BlockError<E> {
    Lz4(Lz4Error),
    Sink(E),
}

/// Decompresses a legacy frame of at most `limit` output bytes block by block, handing each
/// block's output to `sink` in order (one buffer of at most a block, reused: the output never
/// exists whole). Input after the last block shorter than a block header (a bzImage's
/// trailing size) is ignored, as the kernel's own decompressor does. Returns the output's
/// length.
pub fn decompress_legacy_blocks<E>(
    input: &[u8],
    limit: usize,
    mut sink: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<usize, BlockError<E>> {
    if !is_legacy(input) {
        return Err(BlockError::Lz4(Lz4Error::NotLegacy));
    }
    // With the slack the short copies below may overrun into.
    let mut buffer = vec![0u8; limit.min(LEGACY_BLOCK_MAX) + SLACK];
    let mut produced = 0;
    let mut at = 4;
    while input.len() - at > 4 {
        let len = u32::from_le_bytes(input[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += 4;
        if len == LEGACY_MAGIC as usize {
            // Concatenated frames: another magic where a block length would be.
            continue;
        }
        let block = input
            .get(at..at.saturating_add(len))
            .ok_or(BlockError::Lz4(Lz4Error::Truncated(at)))?;
        let end = (limit - produced).min(buffer.len() - SLACK);
        let n = decompress_block(block, at, &mut buffer, end).map_err(|e| match e {
            Lz4Error::TooLong { at, .. } => BlockError::Lz4(Lz4Error::TooLong { at, limit }),
            e => BlockError::Lz4(e),
        })?;
        sink(&buffer[..n]).map_err(BlockError::Sink)?;
        produced += n;
        at += len;
    }
    Ok(produced)
}

/// How far past the output's end a short copy may write: a literal run or a match of up to
/// this many bytes is copied as one fixed-size move (most of a kernel's are that short).
const SLACK: usize = 16;

/// One LZ4 block written to the start of `out`, ending at most at `end` (≤ `out.len() −
/// SLACK`): the legacy format's blocks are independent (a match reaches only into its own
/// block's output). `base` is the block's input offset, for errors. Returns its length.
fn decompress_block(block: &[u8], base: usize, out: &mut [u8], end: usize) -> Result<usize, Lz4Error> {
    let mut pos = 0;
    let mut i = 0;
    let truncated = |i: usize| Lz4Error::Truncated(base + i);
    // A length nibble of 15 continues in the bytes that follow.
    let length = |nibble: usize, i: &mut usize| -> Result<usize, Lz4Error> {
        let mut n = nibble;
        if nibble == 15 {
            loop {
                let b = *block.get(*i).ok_or(truncated(*i))?;
                *i += 1;
                n += b as usize;
                if b != 255 {
                    break;
                }
            }
        }
        Ok(n)
    };
    while i < block.len() {
        let token = block[i] as usize;
        i += 1;
        let literals = length(token >> 4, &mut i)?;
        if i.saturating_add(literals) > block.len() {
            return Err(truncated(i));
        }
        if pos + literals > end {
            return Err(Lz4Error::TooLong {
                at: base + i,
                limit: end,
            });
        }
        if literals <= SLACK && i + SLACK <= block.len() {
            out[pos..pos + SLACK].copy_from_slice(&block[i..i + SLACK]);
        } else {
            out[pos..pos + literals].copy_from_slice(&block[i..i + literals]);
        }
        pos += literals;
        i += literals;
        if i == block.len() {
            break; // the last sequence: literals only
        }
        let offset = block.get(i..i + 2).ok_or(truncated(i))?;
        let offset = u16::from_le_bytes([offset[0], offset[1]]) as usize;
        let at = base + i;
        i += 2;
        let len = length(token & 15, &mut i)? + 4;
        if offset == 0 || offset > pos {
            return Err(Lz4Error::BadOffset { at, offset });
        }
        if pos + len > end {
            return Err(Lz4Error::TooLong { at, limit: end });
        }
        let from = pos - offset;
        if offset >= SLACK && len <= SLACK {
            out.copy_within(from..from + SLACK, pos);
        } else if offset >= len {
            out.copy_within(from..from + len, pos);
        } else if offset == 1 {
            let byte = out[from];
            out[pos..pos + len].fill(byte);
        } else {
            // Overlapping: the match repeats its first `offset` bytes. Copied in whole periods
            // (each copy doubles what there is to copy from), never from bytes not yet written.
            let mut done = 0;
            while done < len {
                let chunk = (pos + done - from).min(len - done);
                out.copy_within(from..from + chunk, pos + done);
                done += chunk;
            }
        }
        pos += len;
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole output of a frame.
    fn decompress_legacy(input: &[u8], limit: usize) -> Result<Vec<u8>, Lz4Error> {
        let mut out = Vec::new();
        decompress_legacy_blocks(input, limit, |b| {
            out.extend_from_slice(b);
            Ok::<(), ()>(())
        })
        .map_err(|e| match e {
            BlockError::Lz4(e) => e,
            BlockError::Sink(()) => unreachable!("the sink never fails"),
        })?;
        Ok(out)
    }

    /// A legacy frame of the given blocks.
    fn frame(blocks: &[&[u8]]) -> Vec<u8> {
        let mut f = LEGACY_MAGIC.to_le_bytes().to_vec();
        for b in blocks {
            f.extend_from_slice(&(b.len() as u32).to_le_bytes());
            f.extend_from_slice(b);
        }
        f
    }

    #[test]
    fn literals_matches_overlaps_and_long_lengths() {
        // "abc", then a match of 7 at offset 3 ("abcabca"), then literal "Z".
        let block: &[u8] = &[0x33, b'a', b'b', b'c', 3, 0, 0x10, b'Z'];
        assert_eq!(decompress_legacy(&frame(&[block]), 100).unwrap(), b"abcabcabcaZ");
        // A run: one literal, a match of 4 + 15 + 255 + 10 at offset 1, and no final literals
        // beyond an empty last sequence.
        let block: &[u8] = &[0x1f, b'x', 1, 0, 255, 10, 0x00];
        let out = decompress_legacy(&frame(&[block]), 1000).unwrap();
        assert_eq!(out.len(), 1 + 4 + 15 + 255 + 10);
        assert!(out.iter().all(|&b| b == b'x'));
        // Two blocks, a trailing size (ignored), another magic between frames.
        let mut f = frame(&[&[0x20, b'h', b'i'], &[0x10, b'!']]);
        f.extend_from_slice(&LEGACY_MAGIC.to_le_bytes());
        f.extend_from_slice(&2u32.to_le_bytes());
        f.extend_from_slice(&[0x10, b'?']);
        f.extend_from_slice(&4u32.to_le_bytes());
        assert_eq!(decompress_legacy(&f, 100).unwrap(), b"hi!?");
    }

    #[test]
    fn corrupt_input_is_an_error_naming_its_offset() {
        assert_eq!(decompress_legacy(b"\x04\x22\x4d\x18xxxx", 10), Err(Lz4Error::NotLegacy));
        // A block longer than the input.
        assert_eq!(
            decompress_legacy(&frame(&[&[0x20, b'h', b'i']])[..10], 100),
            Err(Lz4Error::Truncated(8))
        );
        // A match reaching before the block's start.
        assert_eq!(
            decompress_legacy(&frame(&[&[0x10, b'a', 2, 0, 0x00]]), 100),
            Err(Lz4Error::BadOffset { at: 10, offset: 2 })
        );
        // Offset 0 is never valid.
        assert!(matches!(
            decompress_legacy(&frame(&[&[0x10, b'a', 0, 0, 0x00]]), 100),
            Err(Lz4Error::BadOffset { offset: 0, .. })
        ));
        // Output past the limit.
        assert!(matches!(
            decompress_legacy(&frame(&[&[0x1f, b'x', 1, 0, 255, 255, 255, 0]]), 100),
            Err(Lz4Error::TooLong { limit: 100, .. })
        ));
        // A length that runs off the end of the block.
        assert!(matches!(
            decompress_legacy(&frame(&[&[0xf0, 255, 255]]), 100),
            Err(Lz4Error::Truncated(_))
        ));
    }

    /// Random bytes after the magic: an error or an output within the limit, never a panic.
    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut f = LEGACY_MAGIC.to_le_bytes().to_vec();
            let len = (seed % 64) as usize;
            f.extend_from_slice(&(len as u32).to_le_bytes());
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                f.push(seed as u8);
            }
            if let Ok(out) = decompress_legacy(&f, 4096) {
                assert!(out.len() <= 4096);
            }
        }
    }
}
