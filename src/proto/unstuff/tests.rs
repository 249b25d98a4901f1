//! The fast engines against the reference engines: property tests on random
//! mail under random chunkings, every split position, every block alignment,
//! the smuggling table, with every block kernel this CPU can run.

use proptest::prelude::*;
use proptest::strategy::Union;

use super::*;

/// Everything observable after feeding a sequence of chunks.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    feeds: Vec<Feed>,
    stats_after_each: Vec<BodyStats>,
    body: Vec<u8>,
    stats: BodyStats,
    done: bool,
}

fn kernels() -> Vec<Kernel> {
    let ks: Vec<Kernel> = Kernel::ALL
        .into_iter()
        .filter(|k| k.is_supported())
        .collect();
    assert!(ks.contains(&Kernel::Generic));
    ks
}

/// Cuts `input` into chunks whose sizes cycle through `sizes` (0 = the rest).
fn chunks<'a>(input: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = input;
    let mut k = 0;
    while !rest.is_empty() {
        let size = sizes.get(k % sizes.len().max(1)).copied().unwrap_or(0);
        let size = if size == 0 {
            rest.len()
        } else {
            size.min(rest.len())
        };
        let (head, tail) = rest.split_at(size);
        out.push(head);
        rest = tail;
        k += 1;
    }
    out
}

/// The DATA contract as a trait, so one driver runs both engines.
trait Data {
    fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Feed;
    fn stats(&self) -> BodyStats;
    fn is_done(&self) -> bool;
}

impl Data for NaiveUnstuffer {
    fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Feed {
        NaiveUnstuffer::feed(self, input, body)
    }
    fn stats(&self) -> BodyStats {
        *NaiveUnstuffer::stats(self)
    }
    fn is_done(&self) -> bool {
        NaiveUnstuffer::is_done(self)
    }
}

impl Data for Unstuffer {
    fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Feed {
        Unstuffer::feed(self, input, body)
    }
    fn stats(&self) -> BodyStats {
        *Unstuffer::stats(self)
    }
    fn is_done(&self) -> bool {
        Unstuffer::is_done(self)
    }
}

fn drive(engine: &mut impl Data, parts: &[&[u8]], prefill: &[u8]) -> Outcome {
    let mut body = prefill.to_vec();
    let mut feeds = Vec::new();
    let mut stats_after_each = Vec::new();
    for part in parts {
        let f = engine.feed(part, &mut body);
        assert!(f.consumed <= part.len());
        assert!(f.done || f.consumed == part.len());
        feeds.push(f);
        stats_after_each.push(engine.stats());
    }
    Outcome {
        feeds,
        stats_after_each,
        body,
        stats: engine.stats(),
        done: engine.is_done(),
    }
}

/// The fast unstuffer, with every kernel, gives what the naive one gives.
fn assert_data_same(parts: &[&[u8]], normalize: bool, max: usize, prefill: &[u8]) -> Outcome {
    let want = drive(&mut NaiveUnstuffer::new(normalize, max), parts, prefill);
    for k in kernels() {
        let mut fast = Unstuffer::with_kernel(normalize, max, k).expect("supported");
        let got = drive(&mut fast, parts, prefill);
        assert_eq!(
            got, want,
            "kernel {k:?}, normalize {normalize}, max {max}, parts {parts:?}"
        );
    }
    assert!(want.body.len() <= max.max(prefill.len()));
    want
}

/// The fast scanner, with every kernel, gives what the naive one gives,
/// after every chunk and after `finish`.
fn assert_bdat_same(parts: &[&[u8]], normalize: bool, max: usize) {
    fn run_naive(parts: &[&[u8]], normalize: bool, max: usize) -> (Vec<BodyStats>, Vec<u8>) {
        let mut s = NaiveScanner::new(normalize, max);
        let mut body = Vec::new();
        let mut seen = Vec::new();
        for p in parts {
            s.feed(p, &mut body);
            seen.push(*s.stats());
        }
        s.finish(&mut body);
        seen.push(*s.stats());
        (seen, body)
    }
    let want = run_naive(parts, normalize, max);
    for k in kernels() {
        let mut s = ChunkScanner::with_kernel(normalize, max, k).expect("supported");
        let mut body = Vec::new();
        let mut seen = Vec::new();
        for p in parts {
            s.feed(p, &mut body);
            seen.push(*s.stats());
        }
        s.finish(&mut body);
        seen.push(*s.stats());
        assert_eq!(
            (seen, body),
            want,
            "kernel {k:?}, normalize {normalize}, max {max}"
        );
    }
}

// ---------------------------------------------------------------- generators

/// A weighted choice; zero-weight options are left out (proptest refuses them).
fn weighted<T: std::fmt::Debug + 'static>(opts: Vec<(u32, BoxedStrategy<T>)>) -> BoxedStrategy<T> {
    Union::new_weighted(opts.into_iter().filter(|(w, _)| *w > 0).collect()).boxed()
}

/// One byte inside a line; `noise` (0..=3) sets how often it is special.
fn line_byte(noise: u32) -> BoxedStrategy<u8> {
    let special = [0u32, 1, 4, 16][noise as usize];
    weighted(vec![
        (64, (b' '..=b'~').boxed()),
        (1 + special, Just(b'.').boxed()),
        (special, Just(b'\r').boxed()),
        (special, Just(b'\n').boxed()),
        (special, Just(0u8).boxed()),
        (special, any::<u8>().boxed()),
    ])
}

/// A line: some leading dots, content, an ending (mostly CRLF).
fn line(noise: u32, dots: u32) -> BoxedStrategy<Vec<u8>> {
    let ends: Vec<(u32, BoxedStrategy<&'static [u8]>)> = vec![
        (24, Just(&b"\r\n"[..]).boxed()),
        (noise, Just(&b"\r"[..]).boxed()),
        (noise, Just(&b"\n"[..]).boxed()),
        (noise, Just(&b"\r\r\n"[..]).boxed()),
        (noise, Just(&b"\n\r"[..]).boxed()),
        (1, Just(&b""[..]).boxed()),
    ];
    (
        weighted(vec![
            (8, Just(0usize).boxed()),
            (dots, Just(1usize).boxed()),
            (dots, Just(2usize).boxed()),
        ]),
        prop::collection::vec(line_byte(noise), 0..90),
        weighted(ends),
    )
        .prop_map(|(dots, content, end)| {
            let mut l = vec![b'.'; dots];
            l.extend_from_slice(&content);
            l.extend_from_slice(end);
            l
        })
        .boxed()
}

/// Mail on the wire: lines, maybe the terminator, maybe bytes after it.
fn wire() -> impl Strategy<Value = Vec<u8>> {
    (0u32..4, 0u32..12)
        .prop_flat_map(|(noise, dots)| {
            (
                prop::collection::vec(line(noise, dots), 0..50),
                0usize..3,
                prop::collection::vec(line_byte(noise), 0..20),
            )
        })
        .prop_map(|(lines, ending, trailer)| {
            let mut w = lines.concat();
            match ending {
                0 => {}
                1 => {
                    w.extend_from_slice(b"\r\n.\r\n");
                    w.extend_from_slice(&trailer);
                }
                _ => w.extend_from_slice(b".\r\n"),
            }
            w
        })
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![0]),
        prop::collection::vec(1usize..200, 1..8),
        prop::collection::vec(1usize..4, 1..4),
        Just(vec![64]),
        Just(vec![63, 65]),
    ]
}

fn body_max() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(usize::MAX), 2 => 0usize..40, 2 => 0usize..3000]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn fast_unstuffer_matches_naive(
        input in wire(),
        sizes in chunk_sizes(),
        normalize in any::<bool>(),
        max in body_max(),
        prefill in prop_oneof![4 => Just(0usize), 1 => 0usize..4],
    ) {
        let parts = chunks(&input, &sizes);
        assert_data_same(&parts, normalize, max, &b"pre"[..prefill.min(3)]);
    }

    #[test]
    fn fast_scanner_matches_naive(
        input in wire(),
        sizes in chunk_sizes(),
        normalize in any::<bool>(),
        max in body_max(),
    ) {
        let parts = chunks(&input, &sizes);
        assert_bdat_same(&parts, normalize, max);
    }
}

// ---------------------------------------------------------- fixed inputs

/// `n` bytes of ordinary CRLF mail with no dots.
fn clean(n: usize) -> Vec<u8> {
    b"Received: from mx.example.org by lmtp\r\nabcdefghij\r\n"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect()
}

/// Short inputs with every kind of edge in them.
fn edge_inputs() -> Vec<Vec<u8>> {
    let short: [&[u8]; 18] = [
        b"",
        b".",
        b".\r\n",
        b"\r\n.\r\n",
        b"a\r\n.\r\nQUIT\r\n",
        b"..a\r\n..\r\n.b\nx.\r\n.\r\n",
        b"a\n.\nb\r\n.\r\n",
        b"a\r.\rb\r\n.\r\n",
        b"a\r\n.\nb\r\n.\r\n",
        b"a\r\n.\r\r\nb\r\n.\r\n",
        b"\r\r\r\n\n\n.\r\n.\r\r\n.\r\n",
        b"\0.\0\r\n.\0\r\n.\r\n",
        b".\r",
        b"a\r",
        b"\r\n.",
        b"\r\n.\r",
        b"x\r\n..\r\n...\r\n.\r\n",
        b"\n\r\n.\r\n\r\n.\r\n",
    ];
    let mut v: Vec<Vec<u8>> = short.iter().map(|s| s.to_vec()).collect();
    // Long enough for whole blocks, so the kernel is on the path.
    for core in [&b"a\r\n.b\r\n"[..], b"\n.\n", b"\r\n.\r\n", b"\r\0\r\n"] {
        let mut w = clean(70);
        w.extend_from_slice(core);
        w.extend_from_slice(&clean(90));
        w.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        v.push(w);
    }
    v
}

#[test]
fn every_split_position_matches_whole_input() {
    for input in edge_inputs() {
        for normalize in [false, true] {
            let whole = assert_data_same(&[&input], normalize, usize::MAX, b"");
            let total = |o: &Outcome| o.feeds.iter().map(|f| f.consumed).sum::<usize>();
            let mut splits: Vec<Vec<&[u8]>> = (0..=input.len())
                .map(|s| vec![&input[..s], &input[s..]])
                .collect();
            splits.push(input.chunks(1).collect());
            if input.len() <= 24 {
                for a in 0..=input.len() {
                    for b in a..=input.len() {
                        splits.push(vec![&input[..a], &input[a..b], &input[b..]]);
                    }
                }
            }
            for parts in splits {
                let got = assert_data_same(&parts, normalize, usize::MAX, b"");
                assert_eq!(got.body, whole.body, "{parts:?}");
                assert_eq!(got.done, whole.done);
                assert_eq!(total(&got), total(&whole));
                assert_eq!(got.stats, whole.stats);
                assert_bdat_same(&parts, normalize, usize::MAX);
            }
        }
    }
}

#[test]
fn every_alignment_matches_naive() {
    let mut cores = edge_inputs();
    cores.push(clean(300));
    for core in &cores {
        for pad in 0..BLOCK_FOR_TESTS + 2 {
            // Padding that is plain line content, and padding that ends on a
            // CRLF so a line start (and a held CR) lands on every offset.
            for style in 0..2 {
                let mut input = if style == 0 {
                    vec![b'p'; pad]
                } else {
                    let mut p = clean(pad);
                    p.extend_from_slice(b"\r\n");
                    p
                };
                input.extend_from_slice(core);
                input.extend_from_slice(&clean(130));
                for normalize in [false, true] {
                    assert_data_same(&[&input], normalize, usize::MAX, b"");
                    assert_data_same(&chunks(&input, &[64]), normalize, 100, b"");
                    assert_bdat_same(&[&input], normalize, usize::MAX);
                }
            }
        }
    }
}

const BLOCK_FOR_TESTS: usize = kernel::BLOCK;

#[test]
fn oversize_cut_at_every_limit() {
    let mut input = b"ab\r\n.c\rd\ne\r\n".to_vec();
    input.extend_from_slice(&clean(200));
    input.extend_from_slice(b"\r\n.\r\n");
    for max in 0..input.len() + 2 {
        for normalize in [false, true] {
            let o = assert_data_same(&[&input], normalize, max, b"");
            let st = o.stats_after_each[0];
            assert_eq!(st.oversize, st.bytes_out > max as u64);
            assert!(!o.body.ends_with(b"\r") || (st.bare_cr > 0 && !normalize));
            assert_data_same(&chunks(&input, &[7]), normalize, max, b"");
            assert_bdat_same(&chunks(&input, &[7]), normalize, max);
        }
    }
}

/// Sequences used for SMTP smuggling: each must be content, never an end.
#[test]
fn smuggling_table() {
    struct Row {
        core: &'static [u8],
        body: &'static [u8],
        body_normalized: &'static [u8],
        bare_cr: u64,
        bare_lf: u64,
        dots_removed: u64,
        nul: u64,
    }
    #[rustfmt::skip]
    let rows = [
        // <LF>.<LF>: no line start after a bare LF, the dot stays.
        Row { core: b"a\n.\nb", body: b"a\n.\nb", body_normalized: b"a\r\n.\r\nb", bare_cr: 0, bare_lf: 2, dots_removed: 0, nul: 0 },
        // <CR>.<CR>
        Row { core: b"a\r.\rb", body: b"a\r.\rb", body_normalized: b"a\r\n.\r\nb", bare_cr: 2, bare_lf: 0, dots_removed: 0, nul: 0 },
        // <LF>.<CR><LF>
        Row { core: b"a\n.\r\nb", body: b"a\n.\r\nb", body_normalized: b"a\r\n.\r\nb", bare_cr: 0, bare_lf: 1, dots_removed: 0, nul: 0 },
        // <CR>.<CR><LF>
        Row { core: b"a\r.\r\nb", body: b"a\r.\r\nb", body_normalized: b"a\r\n.\r\nb", bare_cr: 1, bare_lf: 0, dots_removed: 0, nul: 0 },
        // <CR><LF>.<LF>: the dot follows a CRLF, so it is stuffing; the LF is bare.
        Row { core: b"a\r\n.\nb", body: b"a\r\n\nb", body_normalized: b"a\r\n\r\nb", bare_cr: 0, bare_lf: 1, dots_removed: 1, nul: 0 },
        // <CR><LF>.<CR><CR><LF>
        Row { core: b"a\r\n.\r\r\nb", body: b"a\r\n\r\r\nb", body_normalized: b"a\r\n\r\n\r\nb", bare_cr: 1, bare_lf: 0, dots_removed: 1, nul: 0 },
        // <CR><LF>.<CR>x
        Row { core: b"a\r\n.\rx", body: b"a\r\n\rx", body_normalized: b"a\r\n\r\nx", bare_cr: 1, bare_lf: 0, dots_removed: 1, nul: 0 },
        // <LF><CR><LF>.<LF>: a bare LF then a real CRLF: the dot goes.
        Row { core: b"a\n\r\n.\nb", body: b"a\n\r\n\nb", body_normalized: b"a\r\n\r\n\r\nb", bare_cr: 0, bare_lf: 2, dots_removed: 1, nul: 0 },
        // <CR><LF>.<LF>.<CR><LF>: only the first dot is at a line start.
        Row { core: b"a\r\n.\n.\r\nb", body: b"a\r\n\n.\r\nb", body_normalized: b"a\r\n\r\n.\r\nb", bare_cr: 0, bare_lf: 1, dots_removed: 1, nul: 0 },
        // <CR><CR><LF>.<CR><CR><LF>
        Row { core: b"a\r\r\n.\r\r\nb", body: b"a\r\r\n\r\r\nb", body_normalized: b"a\r\n\r\n\r\n\r\nb", bare_cr: 2, bare_lf: 0, dots_removed: 1, nul: 0 },
        // <LF>.<LF> right at the data's start (line start, then a bare LF).
        Row { core: b"\n.\n", body: b"\n.\n", body_normalized: b"\r\n.\r\n", bare_cr: 0, bare_lf: 2, dots_removed: 0, nul: 0 },
        // <CR><LF>..<CR><LF>: a stuffed dot line.
        Row { core: b"a\r\n..\r\nb", body: b"a\r\n.\r\nb", body_normalized: b"a\r\n.\r\nb", bare_cr: 0, bare_lf: 0, dots_removed: 1, nul: 0 },
        // <CR><LF>.<NUL><CR><LF>
        Row { core: b"a\r\n.\0\r\nb", body: b"a\r\n\0\r\nb", body_normalized: b"a\r\n\0\r\nb", bare_cr: 0, bare_lf: 0, dots_removed: 1, nul: 1 },
    ];
    const END: &[u8] = b"\r\n.\r\nQUIT\r\n";
    for row in &rows {
        // Short, and behind a block of clean mail so the kernel meets it.
        for prefix in [Vec::new(), clean(77)] {
            let mut input = prefix.clone();
            input.extend_from_slice(row.core);
            input.extend_from_slice(END);
            for normalize in [false, true] {
                let o = assert_data_same(&[&input], normalize, usize::MAX, b"");
                let st = o.stats_after_each[0];
                let name = String::from_utf8_lossy(row.core);
                // The only end is the real one: everything but "QUIT\r\n" used.
                assert_eq!(o.feeds[0].consumed, input.len() - 6, "{name:?}");
                assert!(o.done);
                let mut want = prefix.clone();
                want.extend_from_slice(if normalize {
                    row.body_normalized
                } else {
                    row.body
                });
                want.extend_from_slice(b"\r\n");
                assert_eq!(o.body, want, "{name:?} normalize {normalize}");
                assert_eq!(st.bare_cr, row.bare_cr, "{name:?}");
                assert_eq!(st.bare_lf, row.bare_lf, "{name:?}");
                assert_eq!(st.dots_removed, row.dots_removed, "{name:?}");
                assert_eq!(st.nul, row.nul, "{name:?}");
                assert_eq!(st.bytes_in, input.len() as u64 - 6);
                assert_eq!(st.bytes_out, want.len() as u64);
                // Byte by byte, it is still not an end.
                let bytes: Vec<&[u8]> = input.chunks(1).collect();
                assert_data_same(&bytes, normalize, usize::MAX, b"");
            }
        }
    }
}

#[test]
fn bdat_scanner_counts_and_holds_cr_across_chunks() {
    let mut s = ChunkScanner::new(true, usize::MAX);
    let mut body = Vec::new();
    s.feed(b"a\r", &mut body);
    assert_eq!(body, b"a");
    s.feed(b"\n.\r\n\0b\r", &mut body);
    s.finish(&mut body);
    assert_eq!(body, b"a\r\n.\r\n\0b\r\n");
    assert_eq!(s.stats().bare_cr, 1);
    assert_eq!(s.stats().nul, 1);
    assert_eq!(s.stats().dots_removed, 0);
    assert_bdat_same(&[b"a\r", b"\n.\r\n\0b\r"], true, usize::MAX);
}

#[test]
fn dense_dots_and_no_newlines() {
    let mut dense = Vec::new();
    for k in 0..200 {
        dense.extend_from_slice(b"..dotted line number ");
        dense.extend_from_slice(k.to_string().as_bytes());
        dense.extend_from_slice(b"\r\n");
    }
    dense.extend_from_slice(b".\r\n");
    let o = assert_data_same(&[&dense], false, usize::MAX, b"");
    assert_eq!(o.stats_after_each[0].dots_removed, 200);
    assert!(o.done);
    let one_line = vec![b'x'; 5000];
    let o = assert_data_same(&chunks(&one_line, &[1000]), true, usize::MAX, b"");
    assert_eq!(o.body, one_line);
}
