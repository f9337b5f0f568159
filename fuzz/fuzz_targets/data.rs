//! The DATA reader, against a model of RFC 5321's end of data. Properties:
//! - the message ends at the first CRLF.CRLF (the CRLF of the DATA command
//!   counting as the first), and nowhere else: no bare LF or CR variant ever
//!   ends it (SMTP smuggling);
//! - reject mode refuses exactly the streams with a bare LF or CR before
//!   that end, normalize mode refuses nothing;
//! - how the stream is cut into reads changes nothing;
//! - dot-stuffing round trip: any text, stuffed as a client must, reads back
//!   as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailnode::protocol::data::{BareLineEnding, DataError, DataReader};

const END: &[u8] = b"\r\n.\r\n";

/// What one reader makes of `input` fed in reads of `chunk` bytes:
/// (content, input consumed, end of data found).
fn read(
    input: &[u8],
    chunk: usize,
    policy: BareLineEnding,
) -> Result<(Vec<u8>, usize, bool), DataError> {
    let mut reader = DataReader::new(policy, u64::MAX);
    let mut content = Vec::new();
    let mut consumed = 0;
    for piece in input.chunks(chunk.max(1)) {
        let progress = reader.feed(piece, &mut content)?;
        assert!(progress.consumed <= piece.len());
        consumed += progress.consumed;
        if progress.done {
            return Ok((content, consumed, true));
        }
        assert_eq!(
            progress.consumed,
            piece.len(),
            "stopped early without an end"
        );
    }
    Ok((content, consumed, false))
}

/// Where the model says the message ends: just past the first CRLF.CRLF,
/// with the DATA command's CRLF in front of the stream.
fn model_end(input: &[u8]) -> Option<usize> {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(input);
    framed
        .windows(END.len())
        .position(|w| w == END)
        .map(|at| at + END.len() - 2)
}

/// Whether `input[..upto]` holds a LF not after a CR, or a CR followed by
/// something other than LF.
fn has_bare_ending(input: &[u8], upto: usize) -> bool {
    (0..upto).any(|i| match input[i] {
        b'\n' => i == 0 || input[i - 1] != b'\r',
        b'\r' => i + 1 < input.len() && input[i + 1] != b'\n',
        _ => false,
    })
}

fn stuff(text: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let line: Vec<u8> = line.iter().copied().filter(|&b| b != b'\r').collect();
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(&line);
        wire.extend_from_slice(b"\r\n");
        expected.extend_from_slice(&line);
        expected.push(b'\n');
    }
    wire.extend_from_slice(b".\r\nQUIT\r\n");
    (wire, expected)
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 16) + 1;
    let end = model_end(input);

    let normalized =
        read(input, input.len(), BareLineEnding::Normalize).expect("normalize mode never refuses");
    assert_eq!(
        normalized.2,
        end.is_some(),
        "end of data disagrees with the model"
    );
    assert_eq!(normalized.1, end.unwrap_or(input.len()), "consumed");
    assert_eq!(
        read(input, chunk, BareLineEnding::Normalize),
        Ok(normalized.clone())
    );

    let strict = read(input, input.len(), BareLineEnding::Reject);
    let bare = has_bare_ending(input, end.unwrap_or(input.len()));
    match &strict {
        Err(DataError::BareLineEnding) => assert!(bare, "refused without a bare line ending"),
        Ok(result) => {
            assert!(!bare, "a bare line ending passed in reject mode");
            // Without bare endings both modes store the same message.
            assert_eq!(result, &normalized);
        }
    }
    assert_eq!(read(input, chunk, BareLineEnding::Reject), strict);

    let (wire, expected) = stuff(input);
    let stuffed = read(&wire, chunk, BareLineEnding::Reject).expect("stuffed text is clean");
    assert_eq!(stuffed, (expected, wire.len() - b"QUIT\r\n".len(), true));
});
