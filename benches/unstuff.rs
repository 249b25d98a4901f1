//! DATA unstuffer throughput: the naive oracle, the fast engine (best kernel
//! and forced generic kernel), and a bare `memmem` count of `\r\n.` over the
//! same bytes (the floor the fast engine is measured against).
//!
//! Bodies: 4 KiB, 64 KiB and 1 MiB of 20-80 byte CRLF lines, dot-sparse (1 line
//! in 100 starts with a dot) and dot-dense (every line does), ending with the
//! terminator; plus one 64 KiB hostile body (random CR / LF / NUL / dot /
//! letter, nearly every byte needs the state machine). Every bench checks its result against one computed up front,
//! so a wrong engine fails instead of looking fast.
//!
//! Run: `cargo bench --bench unstuff` (about a minute). Figures and
//! the machine they came from: docs/BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lmtp_ingest::proto::unstuff::{Kernel, NaiveUnstuffer, Unstuffer};
use memchr::memmem;

/// A small deterministic generator (xorshift64*), so every run measures the
/// same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Mail on the wire, about `size` bytes: CRLF lines of 20-80 bytes; a line
/// that starts with a dot is stuffed (`..`) as a client would send it; one
/// line in `dot_every` does. Ends with `.\r\n` after the last CRLF.
fn wire(size: usize, dot_every: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut w = Vec::with_capacity(size + 100);
    while w.len() + 83 < size {
        let line_len = 20 + rng.below(61) as usize; // CRLF included
        let start = w.len();
        if rng.below(dot_every) == 0 {
            w.extend_from_slice(b"..");
        }
        while w.len() - start < line_len - 2 {
            w.push(b' ' + rng.below(95) as u8);
        }
        w.extend_from_slice(b"\r\n");
    }
    w.extend_from_slice(b".\r\n");
    w
}

struct Case {
    name: String,
    wire: Vec<u8>,
    body_len: usize,
    crlf_dot_count: usize,
}

/// The worst case for a block engine: about `size` bytes where every byte is
/// a CR, LF, NUL, dot or letter at random (almost every byte is dirty).
fn hostile(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut w: Vec<u8> = (0..size - 5)
        .map(|_| b"\r\n\0.a"[rng.below(5) as usize])
        .collect();
    // No early end: break every <CRLF>.<CRLF> (and a first-line dot) by
    // turning its dot into a letter.
    w[0] = b'a';
    for k in 2..w.len().saturating_sub(2) {
        if &w[k - 2..k + 3] == b"\r\n.\r\n" {
            w[k] = b'a';
        }
    }
    w.extend_from_slice(b"\r\n.\r\n");
    w
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (size, size_name) in [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")] {
        for (dot_every, density) in [(100, "sparse"), (1, "dense"), (0, "hostile")] {
            if density == "hostile" && size != 64 << 10 {
                continue;
            }
            let wire = match density {
                "hostile" => hostile(size, 0x5eed ^ size as u64),
                _ => wire(size, dot_every, 0x5eed ^ size as u64 ^ dot_every),
            };
            // Expected results, computed once by the oracle and a byte loop.
            let mut body = Vec::new();
            let mut naive = NaiveUnstuffer::new(false, usize::MAX);
            let f = naive.feed(&wire, &mut body);
            assert!(f.done && f.consumed == wire.len());
            let crlf_dot_count = wire.windows(3).filter(|w| w == b"\r\n.").count();
            out.push(Case {
                name: format!("{size_name}/{density}"),
                body_len: body.len(),
                crlf_dot_count,
                wire,
            });
        }
    }
    out
}

fn unstuff(c: &mut Criterion) {
    let mut group = c.benchmark_group("unstuff");
    group
        .warm_up_time(Duration::from_millis(400))
        .measurement_time(Duration::from_millis(1200))
        .sample_size(20);
    for case in cases() {
        group.throughput(Throughput::Bytes(case.wire.len() as u64));
        let mut body = Vec::with_capacity(case.wire.len());

        group.bench_with_input(BenchmarkId::new("naive", &case.name), &case, |b, case| {
            b.iter(|| {
                body.clear();
                let mut u = NaiveUnstuffer::new(false, usize::MAX);
                let f = u.feed(black_box(&case.wire), &mut body);
                assert!(f.done && body.len() == case.body_len);
            })
        });
        for (engine, kernel) in [("fast", Kernel::best()), ("fast-generic", Kernel::Generic)] {
            group.bench_with_input(BenchmarkId::new(engine, &case.name), &case, |b, case| {
                b.iter(|| {
                    body.clear();
                    let mut u = Unstuffer::with_kernel(false, usize::MAX, kernel).unwrap();
                    let f = u.feed(black_box(&case.wire), &mut body);
                    assert!(f.done && body.len() == case.body_len);
                })
            });
        }
        let finder = memmem::Finder::new(b"\r\n.");
        group.bench_with_input(BenchmarkId::new("memmem", &case.name), &case, |b, case| {
            b.iter(|| {
                let n = finder.find_iter(black_box(&case.wire)).count();
                assert_eq!(n, case.crlf_dot_count);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, unstuff);
criterion_main!(benches);
