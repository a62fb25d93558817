//! `BlobChunk` messages on the wire without tonic's codec, so their
//! payloads are never copied: [`framing`] writes the few bytes in front of
//! a payload, and [`payload`] takes the payloads out of the HTTP/2 DATA
//! frames of a body that carries them.
//!
//! tonic's `Streaming` gathers every DATA frame into a buffer of its own
//! before decoding a message: one memcpy of every byte of a blob. A
//! `BlobChunk` is a single `bytes` field, so its payload can be taken
//! straight out of the frames: after a message's gRPC header and the
//! field's key and length, each frame (or the part of it the message
//! covers) is one piece. Pieces therefore follow the frames, not the
//! messages, which every consumer of a payload stream accepts (they cut,
//! hash or verify arbitrary pieces).
//!
//! Anything but that one-field layout (unknown fields, an empty message) is
//! gathered and decoded by prost, as tonic would. Both ends use them: the
//! server frames Read answers and parses Put requests, the `grpc` tier
//! parses Read answers and frames Put requests.
//!
//! [`messages`] takes whole messages of any type out of a body the same
//! way: a message that arrived in one frame is a slice of it, so prost
//! decodes its `bytes` fields (a Stat's inline blob) as slices of what h2
//! received rather than of tonic's copy.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use http_body_util::BodyExt;
use prost::Message;
use tonic::Status;
use tonic::body::Body;

use super::snix::BlobChunk;
use super::wire::{DATA_KEY, MESSAGE_HEADER};

/// The bytes in front of a `BlobChunk` with a `len`-byte payload: the
/// gRPC message header (uncompressed, message length) and the field's key
/// and length. An empty payload is the empty message (proto3 omits it).
pub(crate) fn framing(len: usize) -> Bytes {
    let field = if len == 0 {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(len as u64) + len
    };
    let mut head = BytesMut::with_capacity(MESSAGE_HEADER + 11);
    head.put_u8(0);
    // A piece is at most the server's message cap, far below 4 GiB.
    head.put_u32(u32::try_from(field).unwrap_or(u32::MAX));
    if len > 0 {
        head.put_u8(DATA_KEY);
        prost::encoding::encode_varint(len as u64, &mut head);
    }
    head.freeze()
}

/// The payload pieces of the `BlobChunk` messages in `body`, each message
/// at most `max_message_size` bytes (`what` names the stream in errors).
/// When the body ends, `end` is given its trailers (`None` if it had
/// none) and says whether that is a good end; the stream then also checks
/// that no message was left unfinished. A body error, a malformed message
/// or a bad end is the stream's last item.
pub(crate) fn payload(
    body: Body,
    max_message_size: usize,
    what: &'static str,
    end: impl FnOnce(Option<http::HeaderMap>) -> Result<(), Status> + Send + 'static,
) -> BoxStream<'static, Result<Bytes, Status>> {
    parse(body, Parser::new(max_message_size, what), end)
}

/// The messages in `body`, whole and undecoded (gRPC header removed), each
/// at most `max_message_size` bytes; otherwise as [`payload`].
pub(crate) fn messages(
    body: Body,
    max_message_size: usize,
    what: &'static str,
    end: impl FnOnce(Option<http::HeaderMap>) -> Result<(), Status> + Send + 'static,
) -> BoxStream<'static, Result<Bytes, Status>> {
    let mut parser = Parser::new(max_message_size, what);
    parser.whole = true;
    parse(body, parser, end)
}

fn parse(
    mut body: Body,
    mut parser: Parser,
    end: impl FnOnce(Option<http::HeaderMap>) -> Result<(), Status> + Send + 'static,
) -> BoxStream<'static, Result<Bytes, Status>> {
    Box::pin(async_stream::stream! {
        let trailers = loop {
            let frame = match body.frame().await {
                Some(Ok(frame)) => frame,
                // A reset stream or a dropped connection: tonic's own
                // status for it.
                Some(Err(status)) => {
                    yield Err(status);
                    return;
                }
                None => break None,
            };
            match frame.into_data() {
                Ok(data) => {
                    parser.push(data);
                    for piece in parser.pieces() {
                        let failed = piece.is_err();
                        yield piece;
                        if failed {
                            return;
                        }
                    }
                }
                Err(frame) => break frame.into_trailers().ok(),
            }
        };
        if let Err(status) = end(trailers).and_then(|()| parser.finished()) {
            yield Err(status);
        }
    })
}

/// Where the parser is within the stream of messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a message's header.
    Header,
    /// In the payload of a one-field `BlobChunk`: this many bytes to go.
    Payload(usize),
    /// A message of another layout, gathered whole (this many bytes).
    Whole(usize),
}

/// Takes the payload out of received frames.
struct Parser {
    /// Received bytes not yet consumed, in order.
    frames: std::collections::VecDeque<Bytes>,
    buffered: usize,
    state: State,
    max_message_size: usize,
    /// What the stream is, for errors ("a Read answer").
    what: &'static str,
    /// Hands out whole messages ([`messages`]), not `BlobChunk` payloads.
    whole: bool,
}

impl Parser {
    /// A parser refusing messages over `max_message_size`; `what` names
    /// the stream in errors.
    fn new(max_message_size: usize, what: &'static str) -> Self {
        Parser {
            frames: Default::default(),
            buffered: 0,
            state: State::Header,
            max_message_size,
            what,
            whole: false,
        }
    }

    /// Adds the next received bytes.
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.buffered += data.len();
            self.frames.push_back(data);
        }
    }

    /// The next piece of payload that is at hand, if any.
    fn next_piece(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            match self.state {
                State::Payload(0) => self.state = State::Header,
                State::Payload(left) => {
                    let Some(front) = self.frames.front_mut() else {
                        return Ok(None);
                    };
                    let piece = if front.len() <= left {
                        self.frames.pop_front().unwrap_or_default()
                    } else {
                        front.split_to(left)
                    };
                    self.buffered -= piece.len();
                    self.state = State::Payload(left - piece.len());
                    return Ok(Some(piece));
                }
                State::Whole(len) => {
                    if self.buffered < len {
                        return Ok(None);
                    }
                    let message = self.take(len);
                    self.state = State::Header;
                    if self.whole {
                        return Ok(Some(message));
                    }
                    let chunk = BlobChunk::decode(message).map_err(|e| {
                        Status::internal(format!("{}'s message does not decode: {e}", self.what))
                    })?;
                    if !chunk.data.is_empty() {
                        return Ok(Some(chunk.data));
                    }
                }
                State::Header => {
                    // The header, and the field's key and length if they
                    // are there: at most 5 + 1 + 10 bytes.
                    let head = self.peek(MESSAGE_HEADER + 11);
                    if head.len() < MESSAGE_HEADER {
                        return Ok(None);
                    }
                    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                    match head[0] {
                        0 => {}
                        1 => {
                            return Err(Status::internal(
                                "protocol error: a compressed message, but no compression was asked for",
                            ));
                        }
                        flag => {
                            return Err(Status::internal(format!(
                                "protocol error: invalid compression flag {flag}"
                            )));
                        }
                    }
                    if len > self.max_message_size {
                        return Err(Status::out_of_range(format!(
                            "{}'s message is {len} bytes, the limit is {}",
                            self.what, self.max_message_size
                        )));
                    }
                    if self.whole {
                        self.take(MESSAGE_HEADER);
                        self.state = State::Whole(len);
                        continue;
                    }
                    match data_field(&head[MESSAGE_HEADER..], len) {
                        Some((prefix, payload)) => {
                            self.take(MESSAGE_HEADER + prefix);
                            self.state = State::Payload(payload);
                        }
                        // Not known yet to be the one-field layout: wait for
                        // more bytes while the prefix may still be cut off,
                        // then take the message whole.
                        None if head.len() < MESSAGE_HEADER + 11
                            && self.buffered < MESSAGE_HEADER + len =>
                        {
                            return Ok(None);
                        }
                        None => {
                            self.take(MESSAGE_HEADER);
                            self.state = State::Whole(len);
                        }
                    }
                }
            }
        }
    }

    /// The pieces at hand, in order, until one is an error (the last item
    /// then).
    fn pieces(&mut self) -> impl Iterator<Item = Result<Bytes, Status>> + '_ {
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let next = self.next_piece().transpose()?;
            failed = next.is_err();
            Some(next)
        })
    }

    /// Checks that the stream did not end inside a message.
    fn finished(&self) -> Result<(), Status> {
        if self.state == State::Header && self.buffered == 0 {
            Ok(())
        } else {
            Err(Status::internal(format!(
                "protocol error: {} ended inside a message",
                self.what
            )))
        }
    }

    /// Up to `n` bytes from the front, copied (only used for the few bytes
    /// of a header).
    fn peek(&self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        for frame in &self.frames {
            let take = (n - out.len()).min(frame.len());
            out.extend_from_slice(&frame[..take]);
            if out.len() == n {
                break;
            }
        }
        out
    }

    /// Removes `n` buffered bytes (there are at least `n`) from the front:
    /// a slice when they lie in one frame, else gathered.
    fn take(&mut self, n: usize) -> Bytes {
        self.buffered -= n;
        match self.frames.front_mut() {
            Some(front) if front.len() > n => return front.split_to(n),
            Some(front) if front.len() == n => return self.frames.pop_front().unwrap_or_default(),
            _ => {}
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let Some(mut front) = self.frames.pop_front() else {
                break;
            };
            let want = n - out.len();
            if front.len() > want {
                out.put(front.split_to(want));
                self.frames.push_front(front);
            } else {
                out.put(front);
            }
        }
        out.freeze()
    }
}

/// If a message of `len` bytes starting with `prefix` is exactly one
/// `data` field: the length of its key and length prefix, and of the
/// payload.
fn data_field(prefix: &[u8], len: usize) -> Option<(usize, usize)> {
    let (&key, mut rest) = prefix.split_first()?;
    if key != DATA_KEY {
        return None;
    }
    let before = rest.len();
    let payload = prost::encoding::decode_varint(&mut rest).ok()?;
    let prefix_len = 1 + before - rest.remaining();
    let payload = usize::try_from(payload).ok()?;
    // A zero-length field is the empty message's business (prost).
    (payload > 0 && prefix_len.checked_add(payload)? == len).then_some((prefix_len, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `payloads` as the messages of a Read answer, one after another.
    fn answer(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            let message = BlobChunk {
                data: Bytes::copy_from_slice(p),
            }
            .encode_to_vec();
            out.push(0);
            out.extend_from_slice(&(message.len() as u32).to_be_bytes());
            out.extend_from_slice(&message);
        }
        out
    }

    /// Feeds `wire` in frames of `frame` bytes and collects the pieces.
    fn parse(wire: &[u8], frame: usize) -> (Vec<Bytes>, Parser) {
        let mut parser = Parser::new(1 << 20, "a test");
        let mut pieces = Vec::new();
        for f in wire.chunks(frame) {
            parser.push(Bytes::copy_from_slice(f));
            while let Some(piece) = parser.next_piece().unwrap() {
                pieces.push(piece);
            }
        }
        (pieces, parser)
    }

    #[test]
    fn any_frame_size_yields_the_payload() {
        let payloads: Vec<Vec<u8>> = [1usize, 127, 128, 300, 70_000, 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8 + 1; n])
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let wire = answer(&refs);
        for frame in [1, 2, 5, 6, 7, 9, 100, 4096, wire.len()] {
            let (pieces, parser) = parse(&wire, frame);
            assert_eq!(pieces.concat(), payloads.concat(), "frames of {frame}");
            assert!(pieces.iter().all(|p| !p.is_empty()));
            parser.finished().unwrap();
        }
    }

    #[test]
    fn a_payload_that_fills_its_frame_is_that_frame() {
        let payload = vec![9u8; 4000];
        let wire = answer(&[&payload]);
        // The framing apart from the payload, as strata's server sends it.
        let head = wire.len() - payload.len();
        let frame = Bytes::from(wire[head..].to_vec());
        let mut parser = Parser::new(1 << 20, "a test");
        parser.push(Bytes::from(wire[..head].to_vec()));
        assert!(parser.next_piece().unwrap().is_none());
        parser.push(frame.clone());
        let piece = parser.next_piece().unwrap().unwrap();
        assert_eq!(piece.as_ptr(), frame.as_ptr(), "the payload was copied");
        assert_eq!(piece.len(), payload.len());
    }

    #[test]
    fn whole_messages_come_out_as_sent_however_framed() {
        use crate::proto::snix::{StatBlobResponse, stat_blob_response::ChunkMeta};
        let stat = StatBlobResponse {
            chunks: vec![ChunkMeta {
                digest: Bytes::from(vec![7u8; 32]),
                size: 5,
            }],
            size: 5,
            inline_data: Bytes::from(vec![3u8; 5000]),
            ..Default::default()
        };
        let mut wire = Vec::new();
        for message in [stat.encode_to_vec(), Vec::new()] {
            wire.push(0);
            wire.extend_from_slice(&(message.len() as u32).to_be_bytes());
            wire.extend_from_slice(&message);
        }
        for frame in [1, 3, 5, 6, 700, wire.len()] {
            let mut parser = Parser::new(1 << 20, "a test");
            parser.whole = true;
            let mut messages = Vec::new();
            for f in wire.chunks(frame) {
                parser.push(Bytes::copy_from_slice(f));
                while let Some(message) = parser.next_piece().unwrap() {
                    messages.push(message);
                }
            }
            parser.finished().unwrap();
            assert_eq!(messages.len(), 2, "frames of {frame}");
            assert_eq!(StatBlobResponse::decode(messages[0].clone()).unwrap(), stat);
            assert!(messages[1].is_empty());
        }

        // In one frame, a message is a slice of it, and so are the bytes
        // fields prost decodes from it.
        let frame = Bytes::from(wire.clone());
        let mut parser = Parser::new(1 << 20, "a test");
        parser.whole = true;
        parser.push(frame.clone());
        let message = parser.next_piece().unwrap().unwrap();
        assert_eq!(message.as_ptr(), frame[MESSAGE_HEADER..].as_ptr());
        let decoded = StatBlobResponse::decode(message).unwrap();
        let inline = decoded.inline_data.as_ptr() as usize;
        assert!((frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len()).contains(&inline));

        // Size limits hold as for payloads.
        let mut parser = Parser::new(100, "a test");
        parser.whole = true;
        parser.push(frame);
        assert_eq!(
            parser.next_piece().unwrap_err().code(),
            tonic::Code::OutOfRange
        );
    }

    #[test]
    fn other_layouts_are_decoded_whole() {
        // An unknown field after the data, and an empty message.
        let mut message = BlobChunk {
            data: Bytes::from_static(b"payload"),
        }
        .encode_to_vec();
        message.extend_from_slice(&[(2 << 3), 42]);
        let mut wire = vec![0];
        wire.extend_from_slice(&(message.len() as u32).to_be_bytes());
        wire.extend_from_slice(&message);
        wire.extend_from_slice(&[0, 0, 0, 0, 0]);
        wire.extend_from_slice(&answer(&[b"more"]));
        for frame in [1, 3, wire.len()] {
            let (pieces, parser) = parse(&wire, frame);
            assert_eq!(pieces.concat(), b"payloadmore", "frames of {frame}");
            parser.finished().unwrap();
        }
    }

    #[test]
    fn bad_framing_is_an_error() {
        let mut compressed = answer(&[b"x"]);
        compressed[0] = 1;
        let mut parser = Parser::new(1 << 20, "a test");
        parser.push(Bytes::from(compressed));
        assert_eq!(
            parser.next_piece().unwrap_err().code(),
            tonic::Code::Internal
        );

        let mut parser = Parser::new(100, "a test");
        parser.push(Bytes::from(answer(&[&[0u8; 200]])));
        assert_eq!(
            parser.next_piece().unwrap_err().code(),
            tonic::Code::OutOfRange
        );

        let wire = answer(&[b"cut short"]);
        let (pieces, parser) = parse(&wire[..wire.len() - 3], 4);
        assert_eq!(pieces.concat(), b"cut sh");
        assert!(parser.finished().is_err());
    }

    #[test]
    fn the_framing_and_payload_are_what_prost_and_tonic_would_send() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 524_288] {
            let data = Bytes::from(vec![7u8; len]);
            let mut ours = framing(len).to_vec();
            ours.extend_from_slice(&data);
            let message = BlobChunk { data }.encode_to_vec();
            let mut theirs = vec![0u8];
            theirs.extend_from_slice(&(message.len() as u32).to_be_bytes());
            theirs.extend_from_slice(&message);
            assert_eq!(ours, theirs, "payload of {len} bytes");
        }
    }
}
