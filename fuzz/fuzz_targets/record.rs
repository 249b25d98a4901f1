//! Fuzz target: the spool's record parser and segment scan, which recovery,
//! `spool verify`, export and follow run over whatever a crash or a bad disk
//! left in a segment.
//!
//! Any bytes: no panic. A record that parses has an envelope that decodes,
//! and encoding the decoded message again gives the same bytes (one encoding
//! per message: what a reader hands on means what was stored). A scan reports
//! positions inside the bytes, its records lie end to end from the header,
//! and cutting the segment where the scan ended (recovery's repair: zeros from
//! there on) leaves a segment that scans clean to the same records.
//!
//! The first input byte chooses: bit 0 makes the record's magic, version,
//! lengths and checksum consistent (else the fuzzer would rarely get past the
//! checksum to the envelope), bit 1 puts the record in the segment twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lmtp_ingest::envelope::Message;
use lmtp_ingest::spool::reader;
use lmtp_ingest::spool::record::{self, Parsed, RECORD_HEADER_LEN};
use lmtp_ingest::spool::segment::{SEGMENT_HEADER_LEN, SegmentHeader, SegmentId};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut rec = rest.to_vec();
    if mode & 1 == 1 {
        make_consistent(&mut rec);
    }
    check_record(&rec);
    let header = SegmentHeader {
        id: SegmentId {
            writer: 0,
            index: 1,
        },
        capacity: 0,
        created_unix_ms: 0,
    };
    let mut seg = header.encode().to_vec();
    seg.extend_from_slice(&rec);
    if mode & 2 == 2 {
        seg.extend_from_slice(&rec);
    }
    check_scan(&seg);
});

/// Magic, version, `record_len` (the input's length), an envelope length
/// within it, the body length that makes them add up, the checksum, and zero
/// padding to the next 8 bytes.
fn make_consistent(rec: &mut Vec<u8>) {
    if rec.len() < RECORD_HEADER_LEN {
        rec.resize(RECORD_HEADER_LEN, 0);
    }
    let len = rec.len();
    rec[0..4].copy_from_slice(b"LSPR");
    rec[4..6].copy_from_slice(&1u16.to_le_bytes());
    rec[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    let asked = u32::from_le_bytes(rec[48..52].try_into().unwrap()) as usize;
    let envelope_len = asked % (len - RECORD_HEADER_LEN + 1);
    rec[48..52].copy_from_slice(&(envelope_len as u32).to_le_bytes());
    let body_len = (len - RECORD_HEADER_LEN - envelope_len) as u64;
    rec[56..64].copy_from_slice(&body_len.to_le_bytes());
    let crc = record::checksum(rec);
    rec[12..16].copy_from_slice(&crc.to_le_bytes());
    rec.resize(record::padded_len(len), 0);
}

fn check_record(bytes: &[u8]) {
    match record::parse(bytes) {
        Parsed::Record(v, padded) => {
            let record_len = RECORD_HEADER_LEN + v.envelope_bytes.len() + v.body.len();
            assert_eq!(padded, record::padded_len(record_len));
            let msg = Message {
                envelope: v.envelope(),
                body: v.body.to_vec(),
            };
            let mut out = Vec::new();
            let n = record::encode(
                &mut out,
                v.header.seq,
                v.header.queue_id,
                v.header.received_at_us,
                &msg,
            )
            .expect("a record that parsed encodes again");
            assert_eq!(n, padded);
            // Bytes 6..8 are the reserved flags, which readers ignore and
            // the checksum (bytes 12..16) covers: the encoder writes zero.
            assert_eq!(out[..6], bytes[..6]);
            assert_eq!(out[8..12], bytes[8..12]);
            assert_eq!(
                out[16..record_len],
                bytes[16..record_len],
                "a parsed record encodes back to different bytes"
            );
            if bytes[6..8] == [0, 0] {
                assert_eq!(out[12..16], bytes[12..16]);
            }
        }
        Parsed::Short { needed } => assert!(needed > bytes.len()),
        Parsed::End | Parsed::Invalid(_) => {}
    }
}

fn check_scan(seg: &[u8]) {
    let mut found = Vec::new();
    let scan = reader::scan_bytes(seg, |offset, len, v| {
        found.push((offset, len, v.header.seq));
    });
    assert!(scan.header.is_ok(), "the header was written sound");
    let len = seg.len() as u64;
    assert!(scan.end >= SEGMENT_HEADER_LEN && scan.end <= len);
    assert!(scan.nonzero_end >= scan.end && scan.nonzero_end <= len);
    assert_eq!(scan.records, found.len() as u64);
    let mut at = SEGMENT_HEADER_LEN;
    for &(offset, l, _) in &found {
        assert_eq!(offset, at, "records lie end to end");
        at += l as u64;
    }
    assert_eq!(at.min(len), scan.end);
    if let Some((offset, _)) = &scan.invalid {
        assert_eq!(*offset, scan.end);
    }
    // Recovery's repair: everything from the end of the sound records is
    // saved aside and zeroed. What remains must read clean, and the same.
    let mut cut = seg.to_vec();
    cut[scan.end as usize..].fill(0);
    let mut again = Vec::new();
    let rescan = reader::scan_bytes(&cut, |offset, len, v| {
        again.push((offset, len, v.header.seq));
    });
    assert!(
        rescan.invalid.is_none(),
        "a cut segment still has a bad record"
    );
    assert_eq!(rescan.end, scan.end);
    assert_eq!(rescan.nonzero_end, scan.end);
    assert_eq!(again, found);
}
