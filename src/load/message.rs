//! The bytes the generator sends, built once per run: for each message size an
//! envelope (`MAIL FROM`, every `RCPT TO`, `DATA`, as one pipelined write or as
//! separate commands), a body (headers, 76-byte lines, some starting with a
//! dot and so dot-stuffed on the wire, then the final `.`) and the same
//! content as one `BDAT n LAST` chunk (RFC 3030: no stuffing, no final dot).
//! Connections send slices of these; nothing is built per message.
//!
//! Sizes are message sizes as stored (before dot-stuffing, without the final
//! dot), which is what the server's spool counts.

/// The sender of every message.
pub const SENDER: &str = "load@example.com";
/// Every 16th body line starts with a dot, so the unstuffer has work to do.
const STUFFED_LINE_EVERY: usize = 16;
/// Body line length including CRLF (RFC 5322 recommends at most 78).
const LINE_BYTES: usize = 76;
const HEADERS: &[u8] = b"From: <load@example.com>\r\nSubject: lmtp-ingest load\r\n\r\n";
/// Smallest size `--size` accepts: the headers plus a short line.
pub const SIZE_MIN: usize = 64;

/// The recipients' domain unless `--rcpt-domain` says otherwise.
pub const RCPT_DOMAIN: &str = "example.com";

/// Recipient `i`'s address in `domain`.
pub fn recipient(i: usize, domain: &str) -> String {
    format!("user{i}@{domain}")
}

/// Whether `d` can stand after the `@` of the generated recipients: a dot
/// atom of letters, digits, hyphens and dots, as a recipient table or
/// domain list would name it.
pub fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// One message size's bytes.
pub struct SizeTemplate {
    pub size: usize,
    /// `MAIL FROM:<..> SIZE=n\r\nRCPT TO:<..>\r\n...DATA\r\n`.
    pub envelope: Vec<u8>,
    /// End offset of each command in `envelope`: MAIL, each RCPT, DATA.
    pub command_ends: Vec<usize>,
    /// `MAIL FROM:<..>\r\n` without `SIZE=`, for servers whose LHLO reply
    /// does not offer SIZE (a client must not send a parameter the server
    /// did not offer: Dovecot answers it with 555).
    pub mail_without_size: Vec<u8>,
    /// The dot-stuffed body followed by `.\r\n`.
    pub body: Vec<u8>,
    /// `BDAT <size> LAST\r\n` followed by the content as stored.
    pub bdat: Vec<u8>,
}

impl SizeTemplate {
    /// Command `k` of the envelope (0: MAIL, 1..=n: RCPT, n+1: DATA).
    pub fn command(&self, k: usize) -> &[u8] {
        let start = if k == 0 { 0 } else { self.command_ends[k - 1] };
        &self.envelope[start..self.command_ends[k]]
    }

    /// End of the last `RCPT` in `envelope`: where a chunking client's
    /// pipelined envelope stops (its `BDAT` follows instead of `DATA`).
    pub fn rcpts_end(&self) -> usize {
        self.command_ends[self.command_ends.len() - 2]
    }
}

/// Everything a connection sends, shared read-only by all threads.
pub struct Templates {
    pub sizes: Vec<SizeTemplate>,
    /// Cumulative weights for picking a size; the last is the total.
    cumulative: Vec<u32>,
    /// Recipient addresses, for checking the per-recipient replies.
    pub recipients: Vec<String>,
}

impl Templates {
    /// `sizes`: (bytes, weight) pairs, weights > 0; recipients
    /// `user0@domain` upwards.
    pub fn new(sizes: &[(usize, u32)], recipients: usize, domain: &str) -> Templates {
        let rcpts: Vec<String> = (0..recipients).map(|i| recipient(i, domain)).collect();
        let mut cumulative = Vec::with_capacity(sizes.len());
        let mut total = 0u32;
        let sizes = sizes
            .iter()
            .map(|&(size, weight)| {
                total += weight;
                cumulative.push(total);
                build(size, &rcpts)
            })
            .collect();
        Templates {
            sizes,
            cumulative,
            recipients: rcpts,
        }
    }

    /// The size index for a random number (any u32).
    pub fn pick(&self, random: u32) -> usize {
        let total = *self.cumulative.last().expect("at least one size");
        let r = random % total;
        self.cumulative.iter().position(|&c| r < c).unwrap_or(0)
    }
}

fn build(size: usize, rcpts: &[String]) -> SizeTemplate {
    let mut envelope = Vec::new();
    let mut command_ends = Vec::with_capacity(rcpts.len() + 2);
    envelope.extend_from_slice(format!("MAIL FROM:<{SENDER}> SIZE={size}\r\n").as_bytes());
    command_ends.push(envelope.len());
    for r in rcpts {
        envelope.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
        command_ends.push(envelope.len());
    }
    envelope.extend_from_slice(b"DATA\r\n");
    command_ends.push(envelope.len());
    let content = content(size);
    let mut bdat = format!("BDAT {size} LAST\r\n").into_bytes();
    bdat.extend_from_slice(&content);
    SizeTemplate {
        size,
        envelope,
        command_ends,
        mail_without_size: format!("MAIL FROM:<{SENDER}>\r\n").into_bytes(),
        body: stuff(&content),
        bdat,
    }
}

/// A message of exactly `size` bytes (>= SIZE_MIN) ending in CRLF.
pub fn content(size: usize) -> Vec<u8> {
    assert!(size >= SIZE_MIN, "size {size} < {SIZE_MIN}");
    let mut m = Vec::with_capacity(size);
    m.extend_from_slice(HEADERS);
    let mut line = 0usize;
    while m.len() < size {
        let left = size - m.len();
        // The last line takes what is left (at least CRLF).
        let len = if left >= 2 * LINE_BYTES {
            LINE_BYTES
        } else {
            left
        };
        let text = len - 2;
        for k in 0..text {
            let c = if k == 0 && line % STUFFED_LINE_EVERY == 0 {
                b'.'
            } else {
                b'a' + ((line * 7 + k) % 26) as u8
            };
            m.push(c);
        }
        m.extend_from_slice(b"\r\n");
        line += 1;
    }
    debug_assert_eq!(m.len(), size);
    m
}

/// The wire form: a dot added before every line that starts with one (RFC
/// 5321 section 4.5.2), then the terminating `.\r\n`.
pub fn stuff(content: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(content.len() + content.len() / 32 + 3);
    for l in content.split_inclusive(|&c| c == b'\n') {
        if l.first() == Some(&b'.') {
            w.push(b'.');
        }
        w.extend_from_slice(l);
    }
    w.extend_from_slice(b".\r\n");
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_has_the_exact_size_and_dot_lines() {
        for size in [SIZE_MIN, 65, 100, 4096, 65536, 100_001] {
            let c = content(size);
            assert_eq!(c.len(), size);
            assert!(c.ends_with(b"\r\n"));
            if size > 1000 {
                assert!(c.windows(2).any(|w| w == b"\n."));
            }
        }
    }

    #[test]
    fn stuffing_doubles_leading_dots_and_terminates() {
        let w = stuff(b"a\r\n.b\r\n..\r\n");
        assert_eq!(w, b"a\r\n..b\r\n...\r\n.\r\n");
        let body = &Templates::new(&[(4096, 1)], 1, RCPT_DOMAIN).sizes[0].body;
        assert!(body.windows(3).any(|w| w == b"\n.."));
        assert!(body.ends_with(b"\r\n.\r\n"));
    }

    #[test]
    fn envelope_commands_split_exactly() {
        let t = Templates::new(&[(4096, 1)], 2, RCPT_DOMAIN);
        let s = &t.sizes[0];
        assert_eq!(s.command(0), b"MAIL FROM:<load@example.com> SIZE=4096\r\n");
        assert_eq!(s.command(1), b"RCPT TO:<user0@example.com>\r\n");
        assert_eq!(s.command(2), b"RCPT TO:<user1@example.com>\r\n");
        assert_eq!(s.command(3), b"DATA\r\n");
        assert_eq!(s.command_ends.last(), Some(&s.envelope.len()));
        assert!(s.envelope[..s.rcpts_end()].ends_with(b"RCPT TO:<user1@example.com>\r\n"));
    }

    #[test]
    fn the_chunk_is_the_content_unstuffed_with_its_exact_length() {
        let s = &Templates::new(&[(4096, 1)], 1, RCPT_DOMAIN).sizes[0];
        let head = b"BDAT 4096 LAST\r\n";
        assert!(s.bdat.starts_with(head));
        assert_eq!(&s.bdat[head.len()..], &content(4096)[..]);
        assert!(!s.bdat.ends_with(b"\r\n.\r\n"));
    }

    #[test]
    fn pick_follows_the_weights() {
        let t = Templates::new(&[(100, 70), (200, 30)], 1, RCPT_DOMAIN);
        let picks: Vec<usize> = (0..100).map(|r| t.pick(r)).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 70);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 30);
    }

    #[test]
    fn recipients_take_the_domain_given() {
        let t = Templates::new(&[(4096, 1)], 2, "mx.example.net");
        assert_eq!(
            t.recipients,
            ["user0@mx.example.net", "user1@mx.example.net"]
        );
        assert_eq!(t.sizes[0].command(2), b"RCPT TO:<user1@mx.example.net>\r\n");
        for ok in ["example.com", "a-b.c0", "localhost"] {
            assert!(valid_domain(ok), "{ok}");
        }
        for bad in ["", "a..b", "a b", "x@y", "<x>", ".x", "x."] {
            assert!(!valid_domain(bad), "{bad}");
        }
    }
}
