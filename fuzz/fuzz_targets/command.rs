//! Fuzz target: the command-line parser.
//!
//! Any bytes: no panic. A line that parses as MAIL or RCPT must parse again to
//! the same value when the path is printed back (the parser keeps addresses
//! exactly as written).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lmtp_ingest::proto::command::{Command, parse};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, line)) = data.split_first() else {
        return;
    };
    let utf8 = flags & 1 == 1;
    match parse(line, utf8) {
        Ok(Command::Rcpt(m)) => {
            let again = format!("RCPT TO:<{}>", m.address());
            assert_eq!(parse(again.as_bytes(), utf8), Ok(Command::Rcpt(m)));
        }
        Ok(Command::Mail { path, params }) => {
            let mut again = format!("MAIL FROM:{path}");
            if params.smtputf8 {
                again.push_str(" SMTPUTF8");
            }
            match parse(again.as_bytes(), utf8) {
                Ok(Command::Mail { path: p2, .. }) => assert_eq!(p2, path),
                other => panic!("{again:?} re-parsed as {other:?}"),
            }
        }
        Ok(Command::Lhlo(name)) => {
            assert!(!name.is_empty() && name.bytes().all(|c| (33..=126).contains(&c)));
        }
        _ => {}
    }
});
