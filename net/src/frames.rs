//! Chunk frames on a byte stream: a `tokio_util` decoder around the protocol's `decode_frame`, so
//! any stream of frames (an HTTP body today, a QUIC stream later) reads the same way, with lengths
//! bounded before anything is buffered.

use bytes::{Bytes, BytesMut};
use shoal_protocol::api::{FRAME_HEADER, FrameError, decode_frame};
use shoal_protocol::{CHUNK_PARAMS, ChunkId};
use tokio_util::codec::Decoder;

/// Why a frame stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    /// The stream itself failed (the connection broke).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid frame sequence.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Splits a byte stream into `(chunk id, chunk bytes)` frames. The bytes are not checked here:
/// whoever reads the frames checks every chunk against its id.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_len: u32,
}

impl Default for FrameDecoder {
    /// Frames up to the largest chunk the chunker cuts.
    fn default() -> Self {
        FrameDecoder { max_len: CHUNK_PARAMS.max as u32 }
    }
}

impl Decoder for FrameDecoder {
    type Item = (ChunkId, Bytes);
    type Error = FrameReadError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        match decode_frame(src, self.max_len)? {
            Some((id, _, used)) => Ok(Some((id, src.split_to(used).freeze().slice(FRAME_HEADER..)))),
            None => {
                // Room for the rest of the frame in progress, once its length is known.
                if src.len() >= FRAME_HEADER {
                    let len = u32::from_be_bytes([src[32], src[33], src[34], src[35]]) as usize;
                    src.reserve(FRAME_HEADER + len - src.len());
                }
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use shoal_protocol::api::encode_frame;
    use tokio_util::codec::FramedRead;

    use super::*;

    async fn read_all(bytes: Vec<u8>, piece: usize) -> Vec<Result<(ChunkId, Bytes), String>> {
        let pieces: Vec<std::io::Result<Bytes>> = bytes.chunks(piece).map(|p| Ok(Bytes::copy_from_slice(p))).collect();
        let reader = tokio_util::io::StreamReader::new(futures::stream::iter(pieces));
        FramedRead::new(reader, FrameDecoder::default()).map(|r| r.map_err(|e| e.to_string())).collect().await
    }

    #[tokio::test]
    async fn frames_split_anywhere_decode_the_same() {
        let chunks: Vec<Vec<u8>> = vec![b"first".to_vec(), vec![], vec![7u8; 70_000]];
        let mut wire = Vec::new();
        for c in &chunks {
            encode_frame(&mut wire, &ChunkId::of(c), c);
        }
        for piece in [1, 5, 36, 37, 4096, wire.len()] {
            let got = read_all(wire.clone(), piece).await;
            let want: Vec<_> = chunks.iter().map(|c| Ok((ChunkId::of(c), Bytes::copy_from_slice(c)))).collect();
            assert_eq!(got, want, "pieces of {piece} bytes");
        }
    }

    #[tokio::test]
    async fn truncated_and_oversized_frames_are_errors() {
        let mut wire = Vec::new();
        encode_frame(&mut wire, &ChunkId::of(b"abc"), b"abc");
        wire.pop();
        assert_eq!(read_all(wire, 3).await, vec![Err(FrameError::Truncated.to_string())]);

        let mut huge = ChunkId::of(b"x").as_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let got = read_all(huge, 64).await;
        assert_eq!(got, vec![Err(FrameError::TooLarge(u32::MAX).to_string())]);
    }
}
