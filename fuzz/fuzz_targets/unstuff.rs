//! Fuzz target: the fast DATA unstuffer and BDAT scanner against the
//! byte-at-a-time reference engines.
//!
//! The first bytes of the input choose the run (normalize flag, body limit,
//! chunk sizes); the rest is the data. Every supported block kernel is run
//! and must agree with the reference on every `Feed`, every `BodyStats` after
//! every chunk, and the body bytes. Must not: skip a comparison to go faster.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmtp_ingest::proto::unstuff::{
    BodyStats, ChunkScanner, Feed, Kernel, NaiveScanner, NaiveUnstuffer, Unstuffer,
};

/// How one run is set up, read from the front of the fuzz input.
struct Setup {
    normalize: bool,
    body_bytes_max: usize,
    chunk_sizes: [usize; 4],
}

fn setup(data: &[u8]) -> Option<(Setup, &[u8])> {
    let (head, rest) = data.split_first_chunk::<6>()?;
    let [flags, limit, c0, c1, c2, c3] = *head;
    let body_bytes_max = match (flags >> 1) & 3 {
        0 | 1 => usize::MAX,
        2 => usize::from(limit),
        _ => usize::from(limit) * 16,
    };
    // 0 means "the rest of the input"; small sizes are likelier, to cut
    // through CRLF pairs and dots often.
    let size = |b: u8| {
        if b >= 250 {
            0
        } else {
            usize::from(b % 130) + 1
        }
    };
    Some((
        Setup {
            normalize: flags & 1 == 1,
            body_bytes_max,
            chunk_sizes: [size(c0), size(c1), size(c2), size(c3)],
        },
        rest,
    ))
}

fn chunks<'a>(input: &'a [u8], sizes: &[usize; 4]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = input;
    for k in 0.. {
        if rest.is_empty() {
            break;
        }
        let size = match sizes[k % 4] {
            0 => rest.len(),
            n => n.min(rest.len()),
        };
        let (head, tail) = rest.split_at(size);
        out.push(head);
        rest = tail;
    }
    out
}

type DataRun = (Vec<Feed>, Vec<BodyStats>, Vec<u8>, bool);

fn data_naive(s: &Setup, parts: &[&[u8]]) -> DataRun {
    let mut u = NaiveUnstuffer::new(s.normalize, s.body_bytes_max);
    let mut body = Vec::new();
    let (mut feeds, mut stats) = (Vec::new(), Vec::new());
    for p in parts {
        feeds.push(u.feed(p, &mut body));
        stats.push(*u.stats());
    }
    (feeds, stats, body, u.is_done())
}

fn data_fast(s: &Setup, parts: &[&[u8]], kernel: Kernel) -> DataRun {
    let mut u = Unstuffer::with_kernel(s.normalize, s.body_bytes_max, kernel).unwrap();
    let mut body = Vec::new();
    let (mut feeds, mut stats) = (Vec::new(), Vec::new());
    for p in parts {
        feeds.push(u.feed(p, &mut body));
        stats.push(*u.stats());
    }
    (feeds, stats, body, u.is_done())
}

fn bdat_naive(s: &Setup, parts: &[&[u8]]) -> (Vec<BodyStats>, Vec<u8>) {
    let mut sc = NaiveScanner::new(s.normalize, s.body_bytes_max);
    let mut body = Vec::new();
    let mut stats = Vec::new();
    for p in parts {
        sc.feed(p, &mut body);
        stats.push(*sc.stats());
    }
    sc.finish(&mut body);
    stats.push(*sc.stats());
    (stats, body)
}

fn bdat_fast(s: &Setup, parts: &[&[u8]], kernel: Kernel) -> (Vec<BodyStats>, Vec<u8>) {
    let mut sc = ChunkScanner::with_kernel(s.normalize, s.body_bytes_max, kernel).unwrap();
    let mut body = Vec::new();
    let mut stats = Vec::new();
    for p in parts {
        sc.feed(p, &mut body);
        stats.push(*sc.stats());
    }
    sc.finish(&mut body);
    stats.push(*sc.stats());
    (stats, body)
}

fuzz_target!(|data: &[u8]| {
    let Some((s, input)) = setup(data) else {
        return;
    };
    let parts = chunks(input, &s.chunk_sizes);

    let want = data_naive(&s, &parts);
    let (_, stats, body, _) = &want;
    if let Some(last) = stats.last() {
        assert!(body.len() <= s.body_bytes_max);
        assert_eq!(last.oversize, last.bytes_out > s.body_bytes_max as u64);
    }
    let want_bdat = bdat_naive(&s, &parts);

    for kernel in Kernel::ALL.into_iter().filter(|k| k.is_supported()) {
        assert_eq!(
            data_fast(&s, &parts, kernel),
            want,
            "DATA, kernel {kernel:?}"
        );
        assert_eq!(
            bdat_fast(&s, &parts, kernel),
            want_bdat,
            "BDAT, kernel {kernel:?}"
        );
    }
});
