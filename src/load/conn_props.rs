//! Property tests of [`ClientConn`] against a model LMTP server: for any mix
//! of accepted and refused MAIL, RCPT, DATA and per-recipient replies, in
//! every client style (pipelining and chunking on or off), with the replies
//! cut into pieces anywhere, the connection ends each message idle, without
//! a protocol error, and counts every recipient exactly once: delivered, or
//! refused under the code that refused it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::conn::{ClientConn, Style};
use super::message::Templates;
use super::tally::Tally;

const LHLO_REPLY: &[u8] =
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-CHUNKING\r\n250 LIMITS RCPTMAX=100\r\n";

/// What the model server answers for one message.
#[derive(Clone, Debug)]
struct Plan {
    mail: u16,
    /// Per RCPT (used only when MAIL was accepted).
    rcpts: Vec<u16>,
    /// DATA's reply when a recipient was accepted: 354 or a refusal.
    data: u16,
    /// Per accepted recipient, after the data.
    finals: Vec<u16>,
}

impl Plan {
    /// Recipients delivered; adds the refused ones to `refused` by code.
    fn expected(&self, chunking: bool, refused: &mut BTreeMap<u16, u64>) -> u64 {
        let n = self.rcpts.len() as u64;
        let mut add = |code: u16, k: u64| *refused.entry(code).or_default() += k;
        if self.mail != 250 {
            add(self.mail, n);
            return 0;
        }
        let accepted: Vec<usize> = (0..self.rcpts.len())
            .filter(|&i| self.rcpts[i] == 250)
            .collect();
        for &r in self.rcpts.iter().filter(|&&r| r != 250) {
            add(r, 1);
        }
        if accepted.is_empty() {
            return 0;
        }
        if !chunking && self.data != 354 {
            add(self.data, accepted.len() as u64);
            return 0;
        }
        let mut ok = 0;
        for &f in &self.finals[..accepted.len()] {
            if f == 250 {
                ok += 1;
            } else {
                add(f, 1);
            }
        }
        ok
    }
}

/// A server that parses what the client sends and answers from a plan.
struct Model {
    plan: Plan,
    input: Vec<u8>,
    mail_ok: bool,
    accepted: Vec<usize>,
    /// Some(n): inside a BDAT chunk with n bytes to go.
    chunk: Option<usize>,
    in_data: bool,
}

impl Model {
    fn new(plan: Plan) -> Model {
        Model {
            plan,
            input: Vec::new(),
            mail_ok: false,
            accepted: Vec::new(),
            chunk: None,
            in_data: false,
        }
    }

    fn finals(&self, out: &mut Vec<u8>) {
        for (k, &i) in self.accepted.iter().enumerate() {
            let code = self.plan.finals[k];
            let status = if code == 250 { "2.0.0" } else { "4.3.0" };
            out.extend_from_slice(
                format!("{code} {status} <user{i}@example.com> QUEUEID result\r\n").as_bytes(),
            );
        }
    }

    /// Takes client bytes, returns every reply they complete.
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.input.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if let Some(left) = self.chunk {
                if self.input.len() < left {
                    return out;
                }
                self.input.drain(..left);
                self.chunk = None;
                if self.mail_ok && !self.accepted.is_empty() {
                    self.finals(&mut out);
                } else {
                    out.extend_from_slice(b"503 5.5.1 No valid recipients\r\n");
                }
                continue;
            }
            if self.in_data {
                let Some(end) = self.input.windows(5).position(|w| w == b"\r\n.\r\n") else {
                    return out;
                };
                self.input.drain(..end + 5);
                self.in_data = false;
                self.finals(&mut out);
                continue;
            }
            let Some(nl) = self.input.iter().position(|&c| c == b'\n') else {
                return out;
            };
            let line: Vec<u8> = self.input.drain(..=nl).collect();
            let line = String::from_utf8(line).expect("client commands are ASCII");
            let line = line.trim_end();
            if line.starts_with("MAIL FROM:") {
                self.mail_ok = self.plan.mail == 250;
                self.accepted.clear();
                out.extend_from_slice(format!("{} mail\r\n", self.plan.mail).as_bytes());
            } else if let Some(rest) = line.strip_prefix("RCPT TO:<user") {
                let i: usize = rest.split('@').next().unwrap().parse().unwrap();
                if !self.mail_ok {
                    out.extend_from_slice(b"503 5.5.1 MAIL first\r\n");
                } else {
                    let code = self.plan.rcpts[i];
                    if code == 250 {
                        self.accepted.push(i);
                    }
                    out.extend_from_slice(format!("{code} rcpt\r\n").as_bytes());
                }
            } else if line == "DATA" {
                if !self.mail_ok || self.accepted.is_empty() {
                    out.extend_from_slice(b"503 5.5.1 No valid recipients\r\n");
                } else {
                    out.extend_from_slice(format!("{} data\r\n", self.plan.data).as_bytes());
                    self.in_data = self.plan.data == 354;
                }
            } else if let Some(rest) = line.strip_prefix("BDAT ") {
                let size = rest.strip_suffix(" LAST").expect("one LAST chunk");
                self.chunk = Some(size.parse().unwrap());
            } else if line == "RSET" {
                self.mail_ok = false;
                self.accepted.clear();
                out.extend_from_slice(b"250 2.0.0 OK\r\n");
            } else {
                panic!("unexpected command {line:?}");
            }
        }
    }
}

fn code(choices: &'static [u16]) -> impl Strategy<Value = u16> {
    proptest::sample::select(choices)
}

fn plan(n: usize) -> impl Strategy<Value = Plan> {
    (
        code(&[250, 250, 250, 451, 550]),
        proptest::collection::vec(code(&[250, 250, 250, 450, 550]), n),
        code(&[354, 354, 354, 451, 554]),
        proptest::collection::vec(code(&[250, 250, 250, 451, 552]), n),
    )
        .prop_map(|(mail, rcpts, data, finals)| Plan {
            mail,
            rcpts,
            data,
            finals,
        })
}

fn case() -> impl Strategy<Value = (bool, bool, Vec<Plan>, Vec<usize>)> {
    (1usize..=4).prop_flat_map(|n| {
        (
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(plan(n), 1..4),
            proptest::collection::vec(1usize..40, 1..8),
        )
    })
}

proptest! {
    #[test]
    fn every_recipient_is_counted_once_in_every_style((pipelining, chunking, plans, cuts) in case()) {
        let n = plans[0].rcpts.len();
        let templates = Arc::new(Templates::new(&[(100, 1)], n, super::message::RCPT_DOMAIN));
        let mut now = Instant::now();
        let mut c = ClientConn::new(templates, Style { pipelining, chunking }, now);
        let mut tally = Tally::default();
        let mut out = Vec::new();
        // Replies are handed over in pieces of the sizes in `cuts`, in turn.
        let mut cut = cuts.iter().cycle();
        let mut deliver = |c: &mut ClientConn, tally: &mut Tally, now: Instant, bytes: &[u8]| {
            let mut rest = bytes;
            while !rest.is_empty() {
                let k = (*cut.next().unwrap()).min(rest.len());
                c.handle_input(now, &rest[..k], tally).expect("no protocol error");
                rest = &rest[k..];
            }
        };
        deliver(&mut c, &mut tally, now, b"220 mx.test LMTP\r\n");
        out.clear();
        prop_assert!(c.poll_transmit(now, &mut out));
        deliver(&mut c, &mut tally, now, LHLO_REPLY);
        prop_assert!(c.is_idle());

        let (mut want_ok, mut want_msgs, mut want_failed) = (0, 0, 0);
        let mut want_refused = BTreeMap::new();
        for plan in plans {
            let mut refused = BTreeMap::new();
            let ok = plan.expected(chunking, &mut refused);
            want_ok += ok;
            want_msgs += u64::from(ok > 0);
            want_failed += u64::from(!refused.is_empty());
            for (code, k) in refused {
                *want_refused.entry(code).or_default() += k;
            }
            let mut server = Model::new(plan);
            c.start_message(0, None);
            let mut steps = 0;
            loop {
                out.clear();
                now += Duration::from_micros(5);
                if !c.poll_transmit(now, &mut out) {
                    break;
                }
                let replies = server.feed(&out);
                deliver(&mut c, &mut tally, now, &replies);
                steps += 1;
                prop_assert!(steps < 100, "no end to the message");
            }
            prop_assert!(c.is_idle(), "the message ended waiting for a reply");
        }
        prop_assert_eq!(tally.recipients, want_ok);
        prop_assert_eq!(tally.messages, want_msgs);
        prop_assert_eq!(tally.messages_failed, want_failed);
        prop_assert_eq!(tally.failures_by_code(), want_refused.into_iter().collect::<Vec<_>>());
    }
}
