//! Real Postfix (3.7, Debian's package) delivering through the real server:
//! a private Postfix instance per test (its own main.cf, master.cf, queue,
//! smtpd port on loopback and log file) with an `lmtp` transport named
//! `ingest` pointing at our TCP listener or our UNIX socket, with
//! `ingest_destination_recipient_limit = 200`. Mail goes in through
//! Postfix's smtpd; a test waits for Postfix's queue to drain, then checks
//! that every (Message-ID, recipient) pair is in our spool exactly once, byte
//! for byte, and that each `status=sent` line Postfix logged carries the
//! queue id of the spool record holding that recipient.
//!
//! Deferral: with the spool at its size cap Postfix gets `452 4.3.1` per
//! recipient after the data and keeps the mail queued; once there is space
//! (a restart with a larger cap, or a consumer reading the spool so that
//! retention removes segments, with the server still running) Postfix
//! redelivers and every message arrives exactly once.
//!
//! The settings these tests write are the ones docs/INTEGRATION.md
//! shows.

mod mta_postfix_util;
mod server_util;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use lmtp_ingest::spool::follow::{Follower, Start};
use lmtp_ingest::spool::reader::{StoredRecord, read_all};
use mta_postfix_util::{
    DOMAIN, Delivery, INGEST_MASTER_CF, Mail, Next, Postfix, Proxy, TestDir, Transcript,
    ingest_main_cf, inject, message_id_of,
};
use server_util::{Server, backends};

/// Writes the server's configuration: its UNIX socket is group `postfix`
/// (Postfix's lmtp client runs as `postfix`), and, when `table` is given, a
/// recipient table. Returns the flags for `serve`.
fn server_config(dir: &Path, table: Option<&[String]>) -> Vec<String> {
    let mut toml =
        String::from("[server]\nunix_socket_mode = \"0660\"\nunix_socket_group = \"postfix\"\n");
    if let Some(addrs) = table {
        let t = dir.join("recipients");
        std::fs::write(&t, addrs.join("\n") + "\n").unwrap();
        toml.push_str(&format!(
            "\n[policy]\nrecipients = \"table\"\ntable = \"{}\"\n",
            t.display()
        ));
    }
    let c = dir.join("lmtp-ingest.toml");
    std::fs::write(&c, toml).unwrap();
    vec!["--config".into(), c.display().to_string()]
}

fn start_server(dir: &Path, io: &str, config: &[String], extra: &[&str]) -> Server {
    let mut flags: Vec<&str> = config.iter().map(String::as_str).collect();
    flags.extend_from_slice(extra);
    Server::start_in(dir, io, &flags)
}

/// 190 messages with one recipient and 10 with 300 (which the limit of 200
/// splits into two deliveries): 3,190 recipients.
fn mixed_mails(tag: &str) -> Vec<Mail> {
    (0..200)
        .map(|n| {
            if n % 20 == 7 {
                Mail::numbered(tag, n, 300, 1500)
            } else {
                Mail::numbered(tag, n, 1, 500 + (n * 37) % 4000)
            }
        })
        .collect()
}

/// The part after the header (Postfix adds `Received:` and may add others).
fn body_part(b: &[u8]) -> &[u8] {
    let at = b
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header/body separator");
    &b[at + 4..]
}

/// Every record in the spool (read while the server runs, as tools do).
fn spool_records(spool: &Path) -> Vec<StoredRecord> {
    let (records, _) = read_all(spool).expect("read the spool");
    records
}

/// Checks that every recipient of `mails` is in `records` exactly once, in a
/// record whose Message-ID and body are that message's, that no record holds
/// more than `rcpts_per_delivery_max` recipients, and that Postfix logged
/// exactly one `status=sent` per recipient with the queue id of the record
/// that holds it. Returns the records of other messages (bounces) and, per
/// injected message, the recipient counts of its deliveries, sorted.
fn check_delivered_exactly_once<'a>(
    pf: &Postfix,
    records: &'a [StoredRecord],
    mails: &[Mail],
    rcpts_per_delivery_max: usize,
) -> (Vec<&'a StoredRecord>, BTreeMap<String, Vec<usize>>) {
    let by_addr: HashMap<&str, &Mail> = mails
        .iter()
        .flat_map(|m| m.rcpts.iter().map(move |r| (r.as_str(), m)))
        .collect();
    let by_msgid: HashMap<&str, &Mail> = mails.iter().map(|m| (m.message_id.as_str(), m)).collect();
    let mut stored: HashMap<String, usize> = HashMap::new();
    let mut by_queue_id: HashMap<String, &StoredRecord> = HashMap::new();
    let mut others = Vec::new();
    // Deliveries (records) of each message, by recipient count.
    let mut parts: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for r in records {
        by_queue_id.insert(r.header.queue_id.to_string(), r);
        let id = message_id_of(&r.body).unwrap_or_default();
        let Some(m) = by_msgid.get(id.as_str()) else {
            others.push(r);
            continue;
        };
        assert!(
            r.envelope.recipients.len() <= rcpts_per_delivery_max,
            "{id}: one delivery carried {} recipients, over the limit of {rcpts_per_delivery_max}",
            r.envelope.recipients.len()
        );
        assert!(
            body_part(&r.body) == body_part(&m.body),
            "{id} (record {}): the stored body differs from the injected one",
            r.header.queue_id
        );
        parts
            .entry(m.message_id.clone())
            .or_default()
            .push(r.envelope.recipients.len());
        for rc in &r.envelope.recipients {
            let addr = rc.mailbox.address();
            let owner = by_addr
                .get(addr.as_str())
                .unwrap_or_else(|| panic!("{id}: stored for {addr}, which was never a recipient"));
            assert_eq!(owner.message_id, id, "{addr} stored with the wrong message");
            *stored.entry(addr).or_default() += 1;
        }
    }
    for (addr, m) in &by_addr {
        let n = stored.get(*addr).copied().unwrap_or(0);
        assert_eq!(n, 1, "{addr} of {} is in the spool {n} times", m.message_id);
    }
    for p in parts.values_mut() {
        p.sort_unstable();
    }
    // Postfix's side: one status=sent per recipient, naming our record.
    let mut sent: HashMap<String, usize> = HashMap::new();
    for d in pf.deliveries("sent") {
        let Some(m) = by_addr.get(d.to.as_str()) else {
            continue; // a bounce (its recipient is the sender), checked by the caller
        };
        let qid = d
            .our_queue_id()
            .unwrap_or_else(|| panic!("no queue id of ours in Postfix's log: {d:?}"));
        let r = by_queue_id
            .get(qid)
            .unwrap_or_else(|| panic!("Postfix logged {qid}, which is not in our spool: {d:?}"));
        assert_eq!(
            message_id_of(&r.body).as_deref(),
            Some(m.message_id.as_str()),
            "{d:?}"
        );
        assert!(
            r.envelope
                .recipients
                .iter()
                .any(|x| x.mailbox.address() == d.to),
            "record {qid} does not hold {}: {d:?}",
            d.to
        );
        *sent.entry(d.to.clone()).or_default() += 1;
    }
    for addr in by_addr.keys() {
        assert_eq!(
            sent.get(*addr).copied().unwrap_or(0),
            1,
            "Postfix's status=sent lines for {addr}"
        );
    }
    (others, parts)
}

fn recipients_of(mails: &[Mail]) -> usize {
    mails.iter().map(|m| m.rcpts.len()).sum()
}

/// Postfix delivers 200 messages (3,190 recipients) to `next`; a recipient
/// our table does not list bounces, and the bounce comes back through the
/// same path to the sender.
fn deliver_mixed(tag: &str, io: &str, unix: bool) {
    let dir = TestDir::new(&format!("{tag}-{io}"));
    let mut mails = mixed_mails(tag);
    // One message to a known and an unknown recipient.
    let mut odd = Mail::numbered(tag, 999, 1, 800);
    odd.rcpts.push(format!("nobody@{DOMAIN}"));
    let mut table: Vec<String> = mails.iter().flat_map(|m| m.rcpts.clone()).collect();
    table.push(odd.rcpts[0].clone());
    table.push(format!("sender@{DOMAIN}"));
    let srv_dir = dir.0.join("lmtp");
    std::fs::create_dir_all(&srv_dir).unwrap();
    let config = server_config(&srv_dir, Some(&table));
    let mut server = start_server(&srv_dir, io, &config, &[]);
    let next = if unix {
        Next::Unix(server.socket.clone())
    } else {
        Next::Tcp(server.addr())
    };
    let mut pf = Postfix::start(
        &dir.0.join("postfix"),
        &ingest_main_cf(&next),
        INGEST_MASTER_CF,
    );
    let t0 = Instant::now();
    inject(pf.smtpd_port, &mails, 4);
    inject(pf.smtpd_port, std::slice::from_ref(&odd), 1);
    // Every recipient, the known one of `odd`, and the bounce to the sender.
    let want_sent = recipients_of(&mails) + 2;
    pf.wait_for("every recipient to be sent", Duration::from_secs(40), |p| {
        p.deliveries("sent").len() >= want_sent
    });
    pf.wait_drained(Duration::from_secs(10));
    eprintln!(
        "{tag} {io}: {want_sent} recipients delivered in {:?}",
        t0.elapsed()
    );

    let records = spool_records(&server.spool);
    // The unknown recipient is checked below, not as a stored one.
    let mut odd_known = odd.clone();
    odd_known.rcpts.truncate(1);
    mails.push(odd_known);
    let (others, parts) = check_delivered_exactly_once(&pf, &records, &mails, 200);
    for m in &mails {
        // 300 recipients: one delivery of 200 and one of 100, nothing else.
        let want = match m.rcpts.len() {
            300 => vec![100, 200],
            n => vec![n],
        };
        assert_eq!(
            parts[&m.message_id], want,
            "{}: recipients per delivery",
            m.message_id
        );
    }
    // The unknown recipient: refused at RCPT, bounced by Postfix, not stored.
    let bounced = pf.deliveries("bounced");
    assert_eq!(bounced.len(), 1, "{bounced:?}");
    assert_eq!(bounced[0].to, format!("nobody@{DOMAIN}"));
    assert!(
        bounced[0]
            .reply
            .contains("550 5.1.1 <nobody@example.com> User unknown (in reply to RCPT TO command)"),
        "{bounced:?}"
    );
    // The bounce: from the null sender to the sender, through our server.
    assert_eq!(
        others.len(),
        1,
        "records of no injected message: {}",
        others.len()
    );
    let b = others[0];
    assert_eq!(b.envelope.reverse_path.to_string(), "<>");
    assert_eq!(
        b.envelope
            .recipients
            .iter()
            .map(|r| r.mailbox.address())
            .collect::<Vec<_>>(),
        vec![format!("sender@{DOMAIN}")]
    );
    let text = String::from_utf8_lossy(&b.body);
    assert!(
        text.contains("nobody@example.com") && text.contains(&odd.message_id),
        "the bounce names the recipient and the message:\n{text}"
    );
    // Where Postfix connected.
    let relay = &pf.deliveries("sent")[0].relay;
    let want_relay = match &next {
        Next::Tcp(addr) => format!("127.0.0.1[127.0.0.1]:{}", addr.rsplit_once(':').unwrap().1),
        // Postfix names a UNIX socket's peer after its own myhostname.
        Next::Unix(path) => format!("mta.test[{}]", path.display()),
    };
    assert_eq!(relay, &want_relay);

    pf.stop();
    assert!(server.stop().success());
    assert_no_warnings(&server);
}

/// Nothing the server logged (after it stopped) is a warning or an error.
fn assert_no_warnings(server: &Server) {
    let bad: Vec<&String> = server
        .log_lines
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(bad.is_empty(), "the server warned: {bad:#?}");
}

#[test]
fn postfix_delivers_every_recipient_over_tcp() {
    if !mta_postfix_util::can_run_postfix() {
        return;
    }
    for io in backends() {
        deliver_mixed("tcp", io, false);
    }
}

#[test]
fn postfix_delivers_every_recipient_over_the_unix_socket() {
    if !mta_postfix_util::can_run_postfix() {
        return;
    }
    for io in backends() {
        deliver_mixed("unix", io, true);
    }
}

/// Postfix's lines for `mails`: (sent, deferred with our 452 4.3.1) recipients.
fn outcomes(pf: &Postfix) -> (Vec<Delivery>, Vec<Delivery>) {
    (pf.deliveries("sent"), pf.deliveries("deferred"))
}

/// Fills a capped spool through Postfix until Postfix has tried every
/// recipient; returns once some were deferred. Checks what Postfix logged
/// and kept queued against what the spool holds.
fn fill_to_the_cap(pf: &Postfix, spool: &Path, mails: &[Mail]) {
    inject(pf.smtpd_port, mails, 2);
    let all = recipients_of(mails);
    // Every recipient tried once: sent, or deferred with our reply.
    pf.wait_for(
        "every recipient to be tried",
        Duration::from_secs(30),
        |p| {
            let (sent, deferred) = outcomes(p);
            let mut tried: Vec<&str> = sent
                .iter()
                .chain(&deferred)
                .map(|d| d.to.as_str())
                .collect();
            tried.sort_unstable();
            tried.dedup();
            tried.len() >= all
        },
    );
    let (sent, deferred) = outcomes(pf);
    assert!(
        !sent.is_empty() && !deferred.is_empty(),
        "the cap should let some mail in and defer the rest: {} sent, {} deferred",
        sent.len(),
        deferred.len()
    );
    // The message that found the spool full is refused after its data, per
    // recipient; from then on MAIL itself is refused, before any data.
    let after_data = |d: &Delivery| {
        d.reply.contains(&format!(
            "said: 452 4.3.1 <{}> Insufficient system storage (in reply to end of DATA command)",
            d.to
        ))
    };
    let at_mail = |d: &Delivery| {
        d.reply
            .contains("said: 452 4.3.1 Insufficient system storage (in reply to MAIL FROM command)")
    };
    for d in &deferred {
        assert!(
            after_data(d) || at_mail(d),
            "deferred for another reason than the full spool: {d:?}"
        );
    }
    assert!(
        deferred.iter().any(at_mail),
        "once full, MAIL should be refused before the data: {deferred:?}"
    );
    // What Postfix keeps queued is exactly what it did not get a 250 for,
    // and what we stored is exactly what it logged as sent. Postfix keeps
    // retrying meanwhile (a retry can fit), so take the three readings again
    // until no delivery happened between them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sent_before = pf.deliveries("sent").len();
        let queued: usize = pf
            .queue()
            .iter()
            .map(|m| m["recipients"].as_array().map_or(0, Vec::len))
            .sum();
        let stored: usize = spool_records(spool)
            .iter()
            .map(|r| r.envelope.recipients.len())
            .sum();
        let sent_after = pf.deliveries("sent").len();
        if sent_before == sent_after && stored == sent_after && queued + stored == all {
            eprintln!(
                "at the cap: {stored} recipients stored, {queued} queued by Postfix after {} deferrals",
                deferred.len()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "at the cap: {stored} recipients stored, {sent_after} sent per Postfix's log, \
             {queued} queued by Postfix, {all} injected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 120 messages of about 40 KiB, 2 recipients each, against a spool capped
/// at three segments of 1 MiB (the segment size server_util sets; room for
/// about 70): Postfix defers the rest.
fn capped_mails(tag: &str) -> Vec<Mail> {
    (0..120)
        .map(|n| Mail::numbered(tag, n, 2, 40_000))
        .collect()
}

const CAPPED: [&str; 2] = ["--spool-bytes-max", "3145728"];

/// A capped server, a Postfix delivering to its UNIX socket, and the mail
/// that filled the spool (see [`fill_to_the_cap`]).
struct Capped {
    dir: TestDir,
    mails: Vec<Mail>,
    srv_dir: std::path::PathBuf,
    config: Vec<String>,
    server: Server,
    pf: Postfix,
}

fn start_capped(name: &str, tag: &str, io: &str) -> Capped {
    let dir = TestDir::new(name);
    let mails = capped_mails(tag);
    let srv_dir = dir.0.join("lmtp");
    std::fs::create_dir_all(&srv_dir).unwrap();
    let config = server_config(&srv_dir, None);
    let server = start_server(&srv_dir, io, &config, &CAPPED);
    // The UNIX socket's path survives a restart (a TCP port 0 would not).
    let next = Next::Unix(server.socket.clone());
    let pf = Postfix::start(
        &dir.0.join("postfix"),
        &ingest_main_cf(&next),
        INGEST_MASTER_CF,
    );
    fill_to_the_cap(&pf, &server.spool, &mails);
    Capped {
        dir,
        mails,
        srv_dir,
        config,
        server,
        pf,
    }
}

#[test]
fn at_the_size_cap_postfix_defers_and_redelivers_exactly_once_after_a_restart() {
    if !mta_postfix_util::can_run_postfix() {
        return;
    }
    for io in backends() {
        let Capped {
            dir: _dir,
            mails,
            srv_dir,
            config,
            mut server,
            pf,
        } = start_capped(&format!("cap-restart-{io}"), "caprestart", io);
        // Space returns: the same spool, restarted with a larger cap.
        assert!(server.stop().success());
        drop(server);
        let mut server = start_server(&srv_dir, io, &config, &["--spool-bytes-max", "16777216"]);
        pf.flush();
        pf.wait_drained_flushing(Duration::from_secs(30), Duration::from_secs(2));
        let records = spool_records(&server.spool);
        let (others, _) = check_delivered_exactly_once(&pf, &records, &mails, 200);
        assert!(others.is_empty());
        assert!(server.stop().success());
    }
}

#[test]
fn at_the_size_cap_postfix_redelivers_exactly_once_when_a_consumer_frees_space() {
    if !mta_postfix_util::can_run_postfix() {
        return;
    }
    for io in backends() {
        let Capped {
            dir: _dir,
            mails,
            mut server,
            pf,
            ..
        } = start_capped(&format!("cap-consumer-{io}"), "capconsumer", io);
        // A consumer reads what is stored; retention then removes the
        // segments it has passed, and the server (not restarted) takes mail
        // again. It keeps reading while Postfix redelivers.
        let mut archive = Follower::open(&server.spool, "archive", Start::Beginning).unwrap();
        let mut read: Vec<StoredRecord> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut flushed = Instant::now();
        loop {
            // As in wait_drained_flushing: with 1 s backoffs Postfix may
            // leave a message in its incoming queue until qmgr is woken.
            if flushed.elapsed() > Duration::from_secs(2) {
                pf.flush();
                flushed = Instant::now();
            }
            let batch = archive.poll(1000).unwrap();
            read.extend(batch);
            archive.save().unwrap();
            if pf.queue().is_empty() {
                // Whatever was committed last.
                read.extend(archive.poll(100_000).unwrap());
                break;
            }
            // (Postfix's log follows from its drop.)
            assert!(
                Instant::now() < deadline,
                "Postfix's queue did not drain while the consumer read: {}",
                pf.queue_summary()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Retention removed segments the consumer had read: the spool now
        // holds fewer records than were delivered.
        let left = spool_records(&server.spool).len();
        assert!(
            left < read.len(),
            "retention removed nothing: {left} records left of {} read",
            read.len()
        );
        let (others, _) = check_delivered_exactly_once(&pf, &read, &mails, 200);
        assert!(others.is_empty());
        assert!(server.stop().success());
    }
}

/// Through a recording proxy: Postfix keeps connections to us open between
/// deliveries, sends `RSET` before it reuses one, and closes a connection it
/// cached without `QUIT` once it has sat idle for
/// `lmtp_connection_cache_time_limit` (2 s). Every message still arrives
/// once.
#[test]
fn postfix_reuses_cached_connections_after_rset_and_drops_them_without_quit() {
    if !mta_postfix_util::can_run_postfix() {
        return;
    }
    for io in backends() {
        let dir = TestDir::new(&format!("cache-{io}"));
        let mails: Vec<Mail> = (0..60)
            .map(|n| Mail::numbered("cache", n, 1, 800))
            .collect();
        let srv_dir = dir.0.join("lmtp");
        std::fs::create_dir_all(&srv_dir).unwrap();
        let config = server_config(&srv_dir, None);
        let mut server = start_server(&srv_dir, io, &config, &[]);
        let proxy = Proxy::start(server.addr());
        let mut pf = Postfix::start(
            &dir.0.join("postfix"),
            &ingest_main_cf(&Next::Tcp(proxy.addr())),
            INGEST_MASTER_CF,
        );
        inject(pf.smtpd_port, &mails, 3);
        pf.wait_drained(Duration::from_secs(30));
        let deadline = Instant::now() + Duration::from_secs(15);
        while proxy.transcripts().iter().any(|t| !t.client_closed) {
            assert!(
                Instant::now() < deadline,
                "Postfix kept a connection open: {:?}",
                proxy
                    .transcripts()
                    .iter()
                    .map(Transcript::commands)
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let records = spool_records(&server.spool);
        let (others, _) = check_delivered_exactly_once(&pf, &records, &mails, 200);
        assert!(others.is_empty());

        let conns: Vec<Vec<String>> = proxy
            .transcripts()
            .iter()
            .map(Transcript::commands)
            .collect();
        let mut reused = 0;
        let mut quitless = 0;
        for c in &conns {
            assert_eq!(c.first().map(String::as_str), Some("LHLO"), "{c:?}");
            assert_eq!(c.iter().filter(|w| *w == "LHLO").count(), 1, "{c:?}");
            let mails_here: Vec<usize> = (0..c.len()).filter(|&i| c[i] == "MAIL").collect();
            for &i in mails_here.iter().skip(1) {
                // A reused connection: the transaction before ended, then RSET.
                assert_eq!(&c[i - 2..i], [".", "RSET"], "reuse without RSET: {c:?}");
            }
            reused += usize::from(mails_here.len() > 1);
            quitless += usize::from(c.last().map(String::as_str) != Some("QUIT"));
        }
        let transactions: usize = conns
            .iter()
            .map(|c| c.iter().filter(|w| *w == "MAIL").count())
            .sum();
        assert_eq!(transactions, mails.len(), "one transaction per message");
        eprintln!(
            "cache {io}: {} messages over {} connections, {reused} reused, {quitless} closed without QUIT",
            mails.len(),
            conns.len()
        );
        // SIZE= on every MAIL: a message over our SIZE is refused before
        // its data (552 5.3.4 at MAIL).
        let mail_lines: Vec<String> = proxy
            .transcripts()
            .iter()
            .flat_map(Transcript::mail_lines)
            .collect();
        assert_eq!(mail_lines.len(), mails.len());
        for m in &mail_lines {
            assert!(m.contains(" SIZE="), "{m}");
        }
        eprintln!("cache {io}: Postfix's MAIL: {}", mail_lines[0]);
        assert!(reused > 0, "Postfix reused no connection: {conns:?}");
        assert!(quitless > 0, "every connection ended with QUIT: {conns:?}");
        pf.stop();
        assert!(server.stop().success());
        // A close without QUIT is an ordinary end of a session for us.
        assert_no_warnings(&server);
    }
}

/// Our recipient limit below Postfix's: with `limits.recipients_max = 100`
/// and `ingest_destination_recipient_limit = 200`, recipients 101 to 200 of
/// a delivery get `452 4.5.3` at RCPT; Postfix defers them, delivers them on
/// a later attempt, and every recipient still arrives exactly once. (It
/// costs a retry per message, after `minimal_backoff_time`, 300 s by
/// default: keep our limit at or above Postfix's.)
#[test]
fn our_recipient_limit_below_postfix_s_defers_the_excess_then_delivers_it() {
    if !mta_postfix_util::can_run_postfix() {
        return;
    }
    for io in backends() {
        let dir = TestDir::new(&format!("rcptmax-{io}"));
        let mails: Vec<Mail> = (0..8)
            .map(|n| Mail::numbered("rcptmax", n, if n % 2 == 0 { 300 } else { 1 }, 1200))
            .collect();
        let srv_dir = dir.0.join("lmtp");
        std::fs::create_dir_all(&srv_dir).unwrap();
        let config = server_config(&srv_dir, None);
        let mut server = start_server(&srv_dir, io, &config, &["--recipients-max", "100"]);
        let next = Next::Tcp(server.addr());
        let mut pf = Postfix::start(
            &dir.0.join("postfix"),
            &ingest_main_cf(&next),
            INGEST_MASTER_CF,
        );
        inject(pf.smtpd_port, &mails, 1);
        let t0 = Instant::now();
        // With Postfix's default backoff the excess would wait 300 s in the
        // deferred queue; with this test's 1 s it is retried at once. Then
        // Postfix sometimes puts the message in its incoming queue while
        // another delivery of it still holds the queue file: qmgr logs
        // "skipped, still being delivered" and looks again only when woken
        // (its 300 s wakeup in master.cf). Flush as an operator would.
        pf.wait_drained_flushing(Duration::from_secs(40), Duration::from_secs(2));
        let skipped = pf
            .log_text()
            .matches("skipped, still being delivered")
            .count();
        let records = spool_records(&server.spool);
        let (others, parts) = check_delivered_exactly_once(&pf, &records, &mails, 100);
        assert!(others.is_empty());
        for m in mails.iter().filter(|m| m.rcpts.len() == 300) {
            assert_eq!(
                parts[&m.message_id],
                vec![100, 100, 100],
                "{}",
                m.message_id
            );
        }
        let deferred = pf.deliveries("deferred");
        eprintln!(
            "rcptmax {io}: drained in {:?} after {} deferrals; qmgr skipped a locked message {skipped} times",
            t0.elapsed(),
            deferred.len()
        );
        assert_eq!(deferred.len(), 4 * 100, "one deferral per excess recipient");
        for d in &deferred {
            assert!(
                d.reply
                    .contains("said: 452 4.5.3 Too many recipients (in reply to RCPT TO command)"),
                "{d:?}"
            );
        }
        pf.stop();
        assert!(server.stop().success());
    }
}

/// docs/INTEGRATION.md shows the settings these tests write: the master.cf
/// line word for word, and each main.cf setting the tests give Postfix.
#[test]
fn doc_shows_the_tested_postfix_configuration() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/INTEGRATION.md"))
            .unwrap();
    assert!(
        doc.contains(mta_postfix_util::INGEST_MASTER_CF.trim_end()),
        "docs/INTEGRATION.md must show the master.cf line {:?}",
        mta_postfix_util::INGEST_MASTER_CF
    );
    for setting in [
        "virtual_mailbox_domains = example.com",
        "virtual_mailbox_maps =",
        "virtual_transport = ingest:inet:[127.0.0.1]:",
        "virtual_transport = ingest:unix:",
        "ingest_destination_recipient_limit = 200",
    ] {
        assert!(
            doc.contains(setting),
            "docs/INTEGRATION.md must show {setting:?}"
        );
    }
}
