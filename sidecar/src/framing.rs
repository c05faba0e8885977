//! Incremental stream decoders for backend response bodies.
//!
//! Owns the two wire framings the sidecar reads while streaming:
//!
//! - [`SseDecoder`]: OpenAI-style Server-Sent Events. Bytes in, complete
//!   `data:` payloads out (one per event; multi-line data joined with `\n`).
//! - [`NdjsonDecoder`]: Ollama-style newline-delimited JSON. Bytes in,
//!   complete non-empty lines out.
//! - [`WholeFrames`]: either framing passed on as bytes, in whole lines or
//!   events only (the unfinished last one held back).
//!
//! Invariants: the output does not depend on how the input was split into
//! chunks (property-tested below); a payload is only returned once its
//! terminator has been seen (or at [`SseDecoder::finish`] /
//! [`NdjsonDecoder::finish`]); a single line or event never grows past
//! [`MAX_FRAME_BYTES`], so a misbehaving backend cannot make the sidecar
//! buffer without bound. Neither decoder interprets the JSON it frames.

use bytes::{Bytes, BytesMut};

/// Largest line or event (in bytes) a decoder buffers before giving up.
///
/// Large enough for a base64 embedding batch or a long tool-call argument in
/// one SSE event, small enough to bound memory per stream.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The SSE payload OpenAI-compatible servers send as their last event.
pub const SSE_DONE: &str = "[DONE]";

/// A framing failure: the backend sent a line or event that is too large.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A single line or event exceeded [`MAX_FRAME_BYTES`].
    #[error("backend stream frame exceeds {limit} bytes")]
    FrameTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
}

/// Splits bytes into lines, accepting `\n`, `\r\n` and a lone `\r` as
/// terminators, including a `\r\n` pair split across two pushes.
#[derive(Debug, Default)]
struct LineSplitter {
    /// Bytes of the line being assembled.
    partial: Vec<u8>,
    /// The previous push ended in `\r`: a leading `\n` now belongs to it.
    after_cr: bool,
    /// Whether a lone `\r` terminates a line (SSE: yes; NDJSON: no, a `\r`
    /// before `\n` is stripped instead).
    cr_terminates: bool,
}

impl LineSplitter {
    fn new(cr_terminates: bool) -> Self {
        Self {
            cr_terminates,
            ..Self::default()
        }
    }

    /// Feeds bytes and calls `on_line` with each complete line (without its
    /// terminator).
    fn push(
        &mut self,
        mut bytes: &[u8],
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<(), FramingError> {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while !bytes.is_empty() {
            let terminator = if self.cr_terminates {
                bytes.iter().position(|&b| b == b'\n' || b == b'\r')
            } else {
                bytes.iter().position(|&b| b == b'\n')
            };
            let Some(pos) = terminator else {
                self.partial.extend_from_slice(bytes);
                return self.check_size();
            };
            self.partial.extend_from_slice(&bytes[..pos]);
            self.check_size()?;
            let was_cr = bytes[pos] == b'\r';
            bytes = &bytes[pos + 1..];
            if was_cr {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let mut line = std::mem::take(&mut self.partial);
            if !self.cr_terminates && line.last() == Some(&b'\r') {
                line.pop();
            }
            on_line(&line);
        }
        Ok(())
    }

    fn check_size(&mut self) -> Result<(), FramingError> {
        if self.partial.len() > MAX_FRAME_BYTES {
            self.partial = Vec::new();
            return Err(FramingError::FrameTooLarge {
                limit: MAX_FRAME_BYTES,
            });
        }
        Ok(())
    }

    /// Returns the unterminated rest, if any.
    fn take_rest(&mut self) -> Option<Vec<u8>> {
        self.after_cr = false;
        let mut rest = std::mem::take(&mut self.partial);
        if !self.cr_terminates && rest.last() == Some(&b'\r') {
            rest.pop();
        }
        (!rest.is_empty()).then_some(rest)
    }
}

/// Incremental Server-Sent Events decoder returning the `data` of each event.
///
/// Follows the WHATWG event-stream rules the OpenAI SDKs use: lines end in
/// `\n`, `\r\n` or `\r`; a blank line dispatches the event; `data:` lines
/// (one optional space after the colon) are joined with `\n`; lines starting
/// with `:` are comments/keep-alives; other fields (`event`, `id`, `retry`)
/// are ignored; an event without data is not returned. The `[DONE]` sentinel
/// is returned as the payload [`SSE_DONE`] for the consumer to interpret.
#[derive(Debug)]
pub struct SseDecoder {
    lines: LineSplitter,
    /// `data` lines of the event being assembled.
    data: Option<String>,
    /// Set once a frame exceeded [`MAX_FRAME_BYTES`]; the stream is unusable.
    failed: bool,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SseDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self {
            lines: LineSplitter::new(true),
            data: None,
            failed: false,
        }
    }

    /// Feeds a chunk of the body; returns the payloads of every event the
    /// chunk completed, in order.
    ///
    /// After an error the decoder stays failed and returns the same error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, FramingError> {
        if self.failed {
            return Err(FramingError::FrameTooLarge {
                limit: MAX_FRAME_BYTES,
            });
        }
        let mut out = Vec::new();
        let mut too_large = false;
        let data = &mut self.data;
        let res = self.lines.push(bytes, |line| {
            if line.is_empty() {
                if let Some(payload) = data.take() {
                    out.push(payload);
                }
                return;
            }
            if let Some(value) = field_value(line, b"data") {
                let value = String::from_utf8_lossy(value);
                match data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&value);
                    }
                    None => *data = Some(value.into_owned()),
                }
                if data.as_ref().is_some_and(|d| d.len() > MAX_FRAME_BYTES) {
                    too_large = true;
                    *data = None;
                }
            }
        });
        if res.is_err() || too_large {
            self.failed = true;
            return Err(FramingError::FrameTooLarge {
                limit: MAX_FRAME_BYTES,
            });
        }
        Ok(out)
    }

    /// Ends the stream: returns the payload of a last event that was not
    /// followed by a blank line (servers that close right after
    /// `data: [DONE]\n` are common enough to be lenient about).
    pub fn finish(&mut self) -> Option<String> {
        if let Some(rest) = self.lines.take_rest()
            && let Some(value) = field_value(&rest, b"data")
        {
            let value = String::from_utf8_lossy(value);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            }
        }
        self.data.take()
    }
}

/// The value of an SSE field line `name:value` (one leading space removed),
/// or `None` when the line is another field or a comment.
fn field_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    if line.first() == Some(&b':') {
        return None;
    }
    let (field, value) = match line.iter().position(|&b| b == b':') {
        Some(colon) => (&line[..colon], &line[colon + 1..]),
        // A field name without a colon has an empty value.
        None => (line, &line[line.len()..]),
    };
    if field != name {
        return None;
    }
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// Incremental NDJSON decoder: bytes in, complete lines out.
///
/// Lines end in `\n`; a `\r` before it is stripped. Blank (or all
/// whitespace) lines are skipped: they carry no object.
#[derive(Debug)]
pub struct NdjsonDecoder {
    lines: LineSplitter,
    failed: bool,
}

impl Default for NdjsonDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl NdjsonDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self {
            lines: LineSplitter::new(false),
            failed: false,
        }
    }

    /// Feeds a chunk of the body; returns every line it completed, in order.
    ///
    /// After an error the decoder stays failed and returns the same error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, FramingError> {
        if self.failed {
            return Err(FramingError::FrameTooLarge {
                limit: MAX_FRAME_BYTES,
            });
        }
        let mut out = Vec::new();
        let res = self.lines.push(bytes, |line| {
            if !line.iter().all(u8::is_ascii_whitespace) {
                out.push(String::from_utf8_lossy(line).into_owned());
            }
        });
        if let Err(e) = res {
            self.failed = true;
            return Err(e);
        }
        Ok(out)
    }

    /// Ends the stream: returns a last line that had no trailing `\n`.
    pub fn finish(&mut self) -> Option<String> {
        self.lines
            .take_rest()
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| String::from_utf8_lossy(&l).into_owned())
    }
}

/// Most a [`WholeFrames`] holds back: a longer line or event goes on in
/// pieces (memory per stream stays bounded). The decoders refuse frames
/// this long anyway.
pub const HOLD_LIMIT: usize = MAX_FRAME_BYTES;

/// Passes a backend's stream on in whole frames: the unterminated last
/// line (NDJSON) or unfinished last event (SSE) of what has arrived waits
/// for the rest of it. If the backend then fails, the half frame is
/// dropped and the error chunk that ends the stream is a frame of its own;
/// glued onto half a line, neither could be parsed by the client. Complete
/// frames go on as they arrive, without a copy when a chunk ends on a
/// frame boundary (the usual case).
#[derive(Debug)]
pub struct WholeFrames {
    sse: bool,
    held: BytesMut,
    /// What went on ends inside a frame (one over [`HOLD_LIMIT`] went on
    /// in pieces).
    open: bool,
    /// SSE: what went on ends in `\r`, which a `\n` may still complete.
    after_cr: bool,
}

impl WholeFrames {
    /// For NDJSON: a frame ends at `\n`.
    pub fn ndjson() -> Self {
        Self::new(false)
    }

    /// For SSE: a frame ends at an empty line (`\n`, `\r\n` or `\r`
    /// terminators).
    pub fn sse() -> Self {
        Self::new(true)
    }

    fn new(sse: bool) -> Self {
        Self {
            sse,
            held: BytesMut::new(),
            open: false,
            after_cr: false,
        }
    }

    /// The bytes of `chunk` (after what was held) that complete frames.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let out = if self.held.is_empty() {
            let mut end = self.frames_end(&chunk);
            if end == 0 && self.after_cr && chunk.first() == Some(&b'\n') {
                // Completes the `\r\n` that ended the last event.
                end = 1;
            }
            if end == chunk.len() {
                self.went_on(&chunk);
                return chunk;
            }
            self.held.extend_from_slice(&chunk[end..]);
            chunk.slice(..end)
        } else {
            self.held.extend_from_slice(&chunk);
            let end = self.frames_end(&self.held);
            self.held.split_to(end).freeze()
        };
        if self.held.len() <= HOLD_LIMIT {
            self.went_on(&out);
            return out;
        }
        let mut all = BytesMut::with_capacity(out.len() + self.held.len());
        all.extend_from_slice(&out);
        all.extend_from_slice(&self.held.split());
        self.open = true;
        self.after_cr = false;
        all.freeze()
    }

    /// Notes where the whole frames that went on ended.
    fn went_on(&mut self, out: &[u8]) {
        if let Some(&last) = out.last() {
            self.open = false;
            self.after_cr = self.sse && last == b'\r';
        }
    }

    /// Whether part of a frame is held back.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// What is held: at a clean end, the last frame without its terminator.
    pub fn take_held(&mut self) -> Bytes {
        self.held.split().freeze()
    }

    /// The backend failed or ended before its final chunk: drops the frame
    /// it did not finish, and returns what must go before an error chunk so
    /// that it starts a frame of its own (nothing, unless a frame over
    /// [`HOLD_LIMIT`] already went on in part).
    pub fn close_for_error(&mut self) -> &'static [u8] {
        self.held.clear();
        if !std::mem::take(&mut self.open) {
            return b"";
        }
        if self.sse { b"\n\n" } else { b"\n" }
    }

    /// Where the last complete frame in `b` ends (0: none).
    fn frames_end(&self, b: &[u8]) -> usize {
        if !self.sse {
            return b.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
        }
        let terminator = |c: u8| c == b'\n' || c == b'\r';
        let mut before = b.len();
        while let Some(pos) = b[..before].iter().rposition(|&c| terminator(c)) {
            // `\r\n` is one terminator.
            let start = if b[pos] == b'\n' && pos > 0 && b[pos - 1] == b'\r' {
                pos - 1
            } else {
                pos
            };
            // Right after another terminator, it ends an empty line: the
            // end of an event.
            if start > 0 && terminator(b[start - 1]) {
                return pos + 1;
            }
            before = start;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;

    fn sse_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(d.push(c).unwrap());
        }
        out.extend(d.finish());
        out
    }

    #[test]
    fn sse_basic_events_and_done() {
        let body = b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
        assert_eq!(sse_all(&[body]), vec!["{\"a\":1}", "{\"b\":2}", SSE_DONE]);
    }

    #[test]
    fn sse_crlf_comments_multiline_and_other_fields() {
        let body = b": keep-alive\r\n\r\nevent: message\r\nid: 7\r\ndata: line1\r\ndata:line2\r\n\r\nretry: 10\r\n\r\ndata: x\r\rdata\n\n";
        // The `retry`-only event has no data and is not returned; a bare
        // `data` field contributes an empty string.
        assert_eq!(sse_all(&[body]), vec!["line1\nline2", "x", ""]);
    }

    #[test]
    fn sse_split_crlf_between_pushes() {
        let mut d = SseDecoder::new();
        assert!(d.push(b"data: a\r").unwrap().is_empty());
        // The `\n` completing `\r\n` must not count as the blank line.
        assert!(d.push(b"\n").unwrap().is_empty());
        assert_eq!(d.push(b"\r\n").unwrap(), vec!["a"]);
    }

    #[test]
    fn sse_finish_flushes_unterminated_event() {
        assert_eq!(
            sse_all(&[b"data: {\"x\":1}\n\ndata: [DONE]"]),
            vec!["{\"x\":1}", SSE_DONE]
        );
        assert_eq!(sse_all(&[b"data: [DONE]\n"]), vec![SSE_DONE]);
        assert!(sse_all(&[b": only a comment"]).is_empty());
    }

    #[test]
    fn sse_data_containing_colons_is_kept() {
        assert_eq!(
            sse_all(&[b"data: {\"url\":\"http://x\"}\n\n"]),
            vec!["{\"url\":\"http://x\"}"]
        );
        // Only one leading space is stripped.
        assert_eq!(sse_all(&[b"data:  two\n\n"]), vec![" two"]);
    }

    #[test]
    fn sse_too_large_event_fails() {
        let mut d = SseDecoder::new();
        let big = vec![b'a'; MAX_FRAME_BYTES + 10];
        let mut chunk = b"data: ".to_vec();
        chunk.extend_from_slice(&big);
        assert!(d.push(&chunk).is_err());
        assert!(d.push(b"\n\n").is_err());
    }

    #[test]
    fn ndjson_lines_crlf_blank_and_finish() {
        let mut d = NdjsonDecoder::new();
        assert_eq!(
            d.push(b"{\"a\":1}\r\n\n  \n{\"b\"").unwrap(),
            vec!["{\"a\":1}"]
        );
        assert_eq!(d.push(b":2}\n{\"c\":3}").unwrap(), vec!["{\"b\":2}"]);
        assert_eq!(d.finish().as_deref(), Some("{\"c\":3}"));
        assert_eq!(d.finish(), None);
    }

    #[test]
    fn ndjson_too_large_line_fails() {
        let mut d = NdjsonDecoder::new();
        assert!(d.push(&vec![b'x'; MAX_FRAME_BYTES + 1]).is_err());
        assert!(d.push(b"\n").is_err());
    }

    /// Splits `body` at the given (sorted, deduplicated) cut points.
    fn split_at_points(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut out = Vec::new();
        let mut prev = 0;
        for p in points {
            out.push(body[prev..p].to_vec());
            prev = p;
        }
        out.push(body[prev..].to_vec());
        out
    }

    fn payload_strategy() -> impl Strategy<Value = String> {
        // JSON-ish text without line terminators, including multi-byte UTF-8.
        "[a-zA-Z0-9{}\":,\\[\\] é漢]{0,40}"
    }

    fn sse_body(payloads: &[String], crlf: bool, comments: bool) -> Vec<u8> {
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut body = String::new();
        for (i, p) in payloads.iter().enumerate() {
            if comments && i % 2 == 0 {
                body.push_str(&format!(": ping{nl}"));
            }
            // Multi-line data for every third payload: split it in two lines.
            if i % 3 == 2 && p.chars().count() > 1 {
                let mid = p
                    .char_indices()
                    .nth(p.chars().count() / 2)
                    .map_or(0, |(i, _)| i);
                body.push_str(&format!(
                    "data: {}{nl}data: {}{nl}{nl}",
                    &p[..mid],
                    &p[mid..]
                ));
            } else {
                body.push_str(&format!("data: {p}{nl}{nl}"));
            }
        }
        body.push_str(&format!("data: [DONE]{nl}{nl}"));
        body.into_bytes()
    }

    fn expected_sse(payloads: &[String]) -> Vec<String> {
        let mut out: Vec<String> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i % 3 == 2 && p.chars().count() > 1 {
                    let mid = p
                        .char_indices()
                        .nth(p.chars().count() / 2)
                        .map_or(0, |(i, _)| i);
                    format!("{}\n{}", &p[..mid], &p[mid..])
                } else {
                    p.clone()
                }
            })
            .collect();
        out.push(SSE_DONE.to_owned());
        out
    }

    proptest! {
        #[test]
        fn sse_any_split_gives_same_payloads(
            payloads in proptest::collection::vec(payload_strategy(), 0..8),
            crlf in any::<bool>(),
            comments in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let body = sse_body(&payloads, crlf, comments);
            let chunks = split_at_points(&body, &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(sse_all(&refs), expected_sse(&payloads));
        }

        #[test]
        fn sse_byte_by_byte_equals_whole(
            payloads in proptest::collection::vec(payload_strategy(), 0..5),
            crlf in any::<bool>(),
        ) {
            let body = sse_body(&payloads, crlf, true);
            let singles: Vec<&[u8]> = body.chunks(1).collect();
            prop_assert_eq!(sse_all(&singles), sse_all(&[&body]));
        }

        #[test]
        fn ndjson_any_split_gives_same_lines(
            lines in proptest::collection::vec("[a-zA-Z0-9{}\":,é漢]{1,40}", 0..10),
            crlf in any::<bool>(),
            trailing_newline in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut body = lines.join(nl);
            if trailing_newline && !lines.is_empty() {
                body.push_str(nl);
            }
            let chunks = split_at_points(body.as_bytes(), &cuts);
            let mut d = NdjsonDecoder::new();
            let mut got = Vec::new();
            for c in &chunks {
                got.extend(d.push(c).unwrap());
            }
            got.extend(d.finish());
            prop_assert_eq!(got, lines);
        }
    }

    fn push_all(frames: &mut WholeFrames, chunks: &[&[u8]]) -> Vec<Bytes> {
        chunks
            .iter()
            .map(|c| frames.push(Bytes::copy_from_slice(c)))
            .collect()
    }

    #[test]
    fn whole_frames_hold_back_a_half_line_and_pass_whole_ones_uncopied() {
        let mut f = WholeFrames::ndjson();
        let whole = Bytes::from_static(b"{\"a\":1}\n{\"b\":2}\n");
        let out = f.push(whole.clone());
        assert_eq!(out.as_ptr(), whole.as_ptr(), "passed on as it came");
        assert_eq!(
            push_all(&mut f, &[b"{\"c\":3}\n{\"d\"", b":4}\n{", b"\"e\":5}"]),
            [&b"{\"c\":3}\n"[..], b"{\"d\":4}\n", b""]
        );
        assert_eq!(
            f.take_held(),
            &b"{\"e\":5}"[..],
            "a clean end gets the rest"
        );
        f.push(Bytes::from_static(b"{\"g\""));
        assert!(f.holds());
        assert_eq!(f.close_for_error(), b"", "nothing of it went on");
        assert_eq!(f.take_held(), &b""[..], "a failure drops the half line");
    }

    #[test]
    fn whole_frames_end_sse_events_at_their_empty_line() {
        let mut f = WholeFrames::sse();
        assert_eq!(
            push_all(
                &mut f,
                &[
                    b"data: 1\n\ndata: 2\n",
                    b"\n",
                    b"data: 3\r\n\r",
                    b"\ndata: 4\r\rdata: 5"
                ]
            ),
            // A lone `\r` ends a line too: the event ends at it, and the
            // `\n` that follows (one `\r\n` after all) goes on next.
            [
                &b"data: 1\n\n"[..],
                b"data: 2\n\n",
                b"data: 3\r\n\r",
                b"\ndata: 4\r\r",
            ]
        );
        assert_eq!(f.take_held(), &b"data: 5"[..]);
        // The `\n` completing a `\r\n` that ended an event goes on at once,
        // not with the next event.
        assert_eq!(
            push_all(&mut f, &[b"data: 6\r\n\r", b"\n", b"data: 7"]),
            [&b"data: 6\r\n\r"[..], b"\n", b""]
        );
    }

    #[test]
    fn whole_frames_pass_a_line_over_the_hold_limit_in_pieces() {
        let mut f = WholeFrames::ndjson();
        let long = vec![b'x'; HOLD_LIMIT + 1];
        assert_eq!(f.push(Bytes::from(long)).len(), HOLD_LIMIT + 1);
        assert_eq!(f.take_held(), &b""[..]);
        // Part of a frame went on: an error after it needs a line of its own.
        assert_eq!(f.close_for_error(), b"\n");
        assert_eq!(f.close_for_error(), b"", "once");
    }

    proptest! {
        /// However the bytes are split, what goes on plus what is held is
        /// exactly what came, and every piece that goes on ends a frame.
        #[test]
        fn whole_frames_lose_nothing_and_cut_only_at_frame_ends(
            sse in any::<bool>(),
            text in "(data: [a-z]{0,6}|[a-z{}:]{0,6}|\r|\n){0,24}",
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut f = if sse { WholeFrames::sse() } else { WholeFrames::ndjson() };
            let mut out = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                let piece = f.push(Bytes::copy_from_slice(&bytes[at..cut]));
                if !piece.is_empty() {
                    if sse {
                        let end = piece.len();
                        // A terminator (`\n`, `\r\n`, `\r`) right after
                        // another.
                        let ends_event = [&b"\n\n"[..], b"\r\r", b"\n\r", b"\n\r\n", b"\r\r\n"]
                            .iter()
                            .any(|end| piece.ends_with(end));
                        // Or the `\n` of a `\r\n` whose `\r` ended the
                        // last piece's event.
                        let completes_crlf = &piece[..] == b"\n" && out.last() == Some(&b'\r');
                        prop_assert!(ends_event || completes_crlf, "{:?} (len {end})", piece);
                    } else {
                        prop_assert!(piece.ends_with(b"\n"), "{:?}", piece);
                    }
                }
                out.extend_from_slice(&piece);
                at = cut;
            }
            out.extend_from_slice(&f.take_held());
            prop_assert_eq!(out, bytes.to_vec());
        }
    }
}
