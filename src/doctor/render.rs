//! The human form of a [`Report`]: aligned columns (check, status, value),
//! the fix under each warn/fail, then the advice, wrapped to 100 columns so
//! it reads at a glance in a terminal or a ticket.
//!
//! Must not: decide anything; it only lays out what the report holds.

use std::fmt::Write as _;

use super::{Report, Status};

const WIDTH: usize = 100;

/// Word-wraps `text` into lines of at most `width` characters (a longer word
/// stays whole on its own line).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Writes `text` wrapped, the first line after `lead`, the rest indented
/// to `indent` columns.
fn hanging(out: &mut String, lead: &str, indent: usize, text: &str) {
    let width = WIDTH.saturating_sub(indent).max(30);
    for (i, l) in wrap(text, width).iter().enumerate() {
        if i == 0 {
            let _ = writeln!(out, "{lead:indent$}{l}");
        } else {
            let _ = writeln!(out, "{:indent$}{l}", "");
        }
    }
}

pub fn text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lmtp-ingest doctor {}: configuration {}, spool {}\n",
        r.version,
        r.config_source,
        r.spool_dir.display()
    );
    let name_w = r
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5)
        + 2;
    let indent = name_w + 7;
    let _ = writeln!(out, "{:name_w$}{:7}VALUE", "CHECK", "STATUS");
    for c in &r.checks {
        let status = match c.status {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        hanging(
            &mut out,
            &format!("{:name_w$}{status:7}", c.name),
            indent,
            &c.value,
        );
        if let Some(fix) = &c.fix {
            hanging(&mut out, "", indent, &format!("fix: {fix}"));
        }
    }
    if !r.advice.is_empty() {
        let _ = writeln!(out, "\nADVICE");
        let w = r.advice.iter().map(|a| a.topic.len()).max().unwrap_or(0) + 2;
        for a in &r.advice {
            hanging(&mut out, &a.topic, w, &a.text);
            if let Some(line) = &a.config {
                hanging(&mut out, "", w, &format!("config: {line}"));
            }
        }
    }
    let _ = writeln!(
        out,
        "\n{} ok, {} warn, {} fail (exit status {})",
        r.summary.ok, r.summary.warn, r.summary.fail, r.exit_status
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_and_width() {
        let w = wrap("aaa bbb ccc dddddddddd e", 7);
        assert_eq!(w, ["aaa bbb", "ccc", "dddddddddd", "e"]);
        assert_eq!(wrap("", 10), [""]);
    }
}
