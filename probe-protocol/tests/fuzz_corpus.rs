//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and regression inputs
//! (`fuzz/regressions/<target>/`) through the same harnesses the libFuzzer targets run
//! (`bakeoff_protocol::harness`), so a decoder change that breaks on an input fuzzing once
//! found fails the ordinary `cargo test` (and `cargo xtask test`).
//!
//! `write_seeds` (ignored) writes the hand-made seeds and the regression inputs of
//! shared/PROTOCOLS.md; `cargo xtask fuzz` grows the corpora from them.

mod common;

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use bakeoff_protocol::{
    detect::HTTP2_PREFACE,
    harness::{Script, TARGETS},
    http1::Side,
};
use common::*;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Files of one corpus directory; fails when it is missing or empty (a moved corpus must not
/// make this test pass by replaying nothing).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no input", dir.display());
    files
}

fn replay(kind: &str) {
    let mut failed = Vec::new();
    let mut total = 0;
    for (target, harness) in TARGETS {
        for file in inputs(&fuzz_dir().join(kind).join(target)) {
            let data = fs::read(&file).expect("readable input");
            total += 1;
            if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "inputs that fail their harness: {failed:#?}"
    );
    eprintln!("{kind}: {total} inputs replayed");
}

#[test]
fn corpora_replay_without_failure() {
    replay("corpus");
}

#[test]
fn regression_inputs_replay_without_failure() {
    replay("regressions");
}

#[test]
fn every_harness_has_a_fuzz_target() {
    for (target, _) in TARGETS {
        let path = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        let src = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            src.contains(&format!("harness::{target}(")),
            "{} does not run harness::{target}",
            path.display()
        );
    }
}

// ----- seeds and regression inputs -----

/// Decoder scripts of one conversation: whole reads, small reads, cut captures, gaps,
/// mid-way attach, reset.
fn decoder_scripts(conv: &[(bool, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let side = |resp: bool| if resp { Side::Response } else { Side::Request };
    let mut out = Vec::new();
    let whole = conv
        .iter()
        .fold(Script::new(false), |s, (r, b)| s.data(side(*r), b));
    out.push(("whole".into(), whole.close(false).into_bytes()));
    for step in [1, 5, 64] {
        let s = conv
            .iter()
            .fold(Script::new(false), |s, (r, b)| s.split(side(*r), b, step));
        out.push((format!("split{step}"), s.into_bytes()));
    }
    // Every read captured to 16 bytes, with uncaptured bytes behind some.
    let s = conv
        .iter()
        .enumerate()
        .fold(Script::new(false), |s, (i, (r, b))| {
            s.cut(side(*r), b, 16, (i % 3) as u8, 2)
        });
    out.push(("cut16".into(), s.into_bytes()));
    // A gap on each side in the middle.
    let mid = conv.len() / 2;
    let s = conv
        .iter()
        .enumerate()
        .fold(Script::new(false), |s, (i, (r, b))| {
            if i == mid || i == mid + 1 {
                s.gap(side(*r))
            } else {
                s.data(side(*r), b)
            }
        });
    out.push(("gaps".into(), s.close(true).into_bytes()));
    // Attached mid-way: from a third of the conversation on, the first read cut in two.
    let from = conv.len() / 3;
    let mut s = Script::new(true);
    for (i, (r, b)) in conv.iter().enumerate().skip(from) {
        if i == from {
            s = s.data(side(*r), &b[b.len() / 2..]);
        } else {
            s = s.data(side(*r), b);
        }
    }
    out.push(("midstream".into(), s.into_bytes()));
    out
}

fn http1_conversation() -> Vec<(bool, Vec<u8>)> {
    vec![
        (
            false,
            http1_request(
                "GET",
                "/api/items/1?x=y",
                &[
                    ("Host", "shop"),
                    ("User-Agent", "curl/8"),
                    ("x-request-id", "r-1"),
                    (
                        "traceparent",
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    ),
                ],
                b"",
            ),
        ),
        (
            true,
            http1_response(200, &[("Content-Type", "application/json")], b"{\"id\":1}"),
        ),
        (
            false,
            http1_request("POST", "/api/orders", &[("Host", "shop")], b"{\"item\":1}"),
        ),
        (true, http1_chunked_response(201, &[b"abc", b"defgh"])),
        (false, http1_request("HEAD", "/", &[], b"")),
        (
            true,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".to_vec(),
        ),
        (
            false,
            [
                http1_request("GET", "/a", &[], b""),
                http1_request("GET", "/b", &[], b""),
            ]
            .concat(),
        ),
        (
            true,
            [
                b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
                http1_response(404, &[], b"no"),
                b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            ]
            .concat(),
        ),
        (
            false,
            http1_request(
                "GET",
                "/ws",
                &[("Upgrade", "websocket"), ("Connection", "Upgrade")],
                b"",
            ),
        ),
        (
            true,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello".to_vec(),
        ),
    ]
}

fn hpack_script(synced: bool, ops: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut s = vec![u8::from(synced)];
    for (k, block) in ops {
        s.push(*k);
        s.extend((block.len() as u16).to_be_bytes());
        s.extend_from_slice(block);
    }
    s
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hpack_seeds() -> Vec<(String, Vec<u8>)> {
    // RFC 7541 C.4 (requests, Huffman) and C.6 (responses, Huffman, eviction at 256 bytes).
    let c4 = [
        hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
        hex("8286 84be 5886 a8eb 1064 9cbf"),
        hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
    ];
    let c6 = [
        hex(
            "3fe1 1f48 8264 0e5f 5886 a8eb 1064 9cbf 6196 d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff 6e91 9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
        ),
        hex("4883 640e ffc1 c0bf"),
    ];
    let lists: Vec<Vec<(&str, &str)>> = vec![
        vec![
            (":method", "POST"),
            (":path", "/shop.Cart/Add"),
            ("x-request-id", "1"),
        ],
        vec![
            (":method", "POST"),
            (":path", "/shop.Cart/Add"),
            ("x-request-id", "2"),
        ],
        vec![(":status", "200"), ("grpc-status", "0"), ("custom", "v")],
    ];
    let loona = loona_blocks(&lists);
    let mut literal = Vec::new();
    literal.push(0x20); // size update to 0
    hpack_int(&mut literal, 5, 0x20, 4096);
    literal.push(0x40);
    hpack_str(&mut literal, b"x-huff", true);
    hpack_str(&mut literal, b"value with spaces", true);
    literal.push(0x10);
    hpack_str(&mut literal, b"never", false);
    hpack_str(&mut literal, b"secret", true);
    hpack_int(&mut literal, 4, 0x00, 4);
    hpack_str(&mut literal, b"/literal/path", false);
    literal.push(0xbe);
    let ops = |blocks: &[Vec<u8>], k: u8| -> Vec<(u8, Vec<u8>)> {
        blocks.iter().map(|b| (k, b.clone())).collect()
    };
    vec![
        ("rfc-c4".into(), hpack_script(true, &ops(&c4, 0))),
        ("rfc-c6".into(), hpack_script(true, &ops(&c6, 2))),
        (
            "rfc-c4-midstream".into(),
            hpack_script(false, &ops(&c4[1..], 0)),
        ),
        ("loona".into(), hpack_script(true, &ops(&loona, 0))),
        (
            "loona-truncated".into(),
            hpack_script(
                true,
                &[
                    (0, loona[0].clone()),
                    (1, loona[1][..loona[1].len() / 2].to_vec()),
                    (0, loona[2].clone()),
                    (3, loona[2].clone()),
                ],
            ),
        ),
        (
            "literal-huffman".into(),
            hpack_script(false, &[(0, literal)]),
        ),
    ]
}

fn tcp_seeds() -> Vec<(String, Vec<u8>)> {
    let request = http1_request("GET", "/", &[("Host", "a")], b"");
    let mut out = Vec::new();
    // Consistent stream: SYN, in order, out of order, retransmitted overlap, ack, FIN.
    let mut s = vec![1u8];
    let isn = 0xffff_ff00u32; // wraps around
    tcp_segment(&mut s, isn, 0, 0, (true, false, false), None);
    tcp_segment(&mut s, isn + 1, 100, 100, (false, false, false), None);
    tcp_segment(
        &mut s,
        isn.wrapping_add(301),
        100,
        50,
        (false, false, false),
        None,
    );
    tcp_segment(
        &mut s,
        isn.wrapping_add(151),
        200,
        200,
        (false, false, false),
        None,
    );
    tcp_segment(
        &mut s,
        isn.wrapping_add(401),
        50,
        50,
        (false, true, false),
        None,
    );
    s.push(4);
    s.extend(isn.wrapping_add(452).to_be_bytes());
    s.push(7);
    out.push(("consistent".into(), s));
    // Small limits: holes given up by overflow, expiry, acknowledgment.
    let mut s = vec![1 | 2 << 1];
    tcp_segment(&mut s, 1000, 10, 10, (false, false, false), None);
    for i in 0..6u32 {
        tcp_segment(&mut s, 1100 + 40 * i, 20, 20, (false, false, false), None);
    }
    s.push(5);
    s.extend(500u16.to_be_bytes());
    s.push(4);
    s.extend(2000u32.to_be_bytes());
    s.push(6);
    tcp_segment(&mut s, 2000, 5, 5, (false, false, true), None);
    out.push(("limits".into(), s));
    // Captured bytes from the input, mid-stream, a GSO segment longer than its capture.
    let mut s = vec![0u8];
    tcp_segment(
        &mut s,
        77,
        request.len() as u16,
        request.len() as u16,
        (false, false, false),
        Some(&request),
    );
    tcp_segment(
        &mut s,
        77 + request.len() as u32,
        9000,
        64,
        (false, false, false),
        Some(&[b'x'; 64]),
    );
    s.push(0x80 | 1); // relative sequence number
    s.extend(9000u32.to_be_bytes());
    s.extend(10u16.to_be_bytes());
    s.extend(10u16.to_be_bytes());
    s.extend_from_slice(b"0123456789");
    out.push(("raw".into(), s));
    out
}

fn detect_seeds() -> Vec<(String, Vec<u8>)> {
    let mut h2 = HTTP2_PREFACE.to_vec();
    h2.extend(h2_frame(4, 0, 0, &[]));
    vec![
        ("h2-preface".into(), h2),
        (
            "h2-settings".into(),
            h2_frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]),
        ),
        ("h2-headers".into(), h2_frame(1, 4, 3, &[0x82, 0x86, 0x84])),
        ("h2-window".into(), h2_frame(8, 0, 0, &[0, 0, 1, 0])),
        (
            "http1".into(),
            http1_request("GET", "/", &[("Host", "a")], b""),
        ),
        ("http1-response".into(), http1_response(200, &[], b"")),
        ("pg-startup".into(), pg_startup("bob", "db")),
        ("pg-ssl".into(), pg_ssl_request()),
        (
            "pg-cancel".into(),
            vec![0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 1, 0, 0, 0, 2],
        ),
        ("tls".into(), vec![0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3]),
    ]
}

/// The crash inputs of shared/PROTOCOLS.md (other crates' crashers), as inputs of our
/// harnesses, and the length bombs.
fn regressions() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    // hpack 0.3 / fluke-hpack 0.3: panic on `3f 0a`; httlib-hpack: panic on `0a`.
    for (name, block) in [("3f0a", vec![0x3f, 0x0a]), ("0a", vec![0x0a])] {
        for synced in [true, false] {
            for k in 0..4 {
                out.push((
                    "hpack",
                    format!("crate-crash-{name}-synced{}-op{k}", u8::from(synced)),
                    hpack_script(synced, &[(k, block.clone())]),
                ));
            }
        }
        // The same bytes as HTTP/2 HEADERS payloads on both sides.
        let mut conv = HTTP2_PREFACE.to_vec();
        conv.extend(h2_frame(1, END_HEADERS | END_STREAM, 1, &block));
        out.push((
            "http2",
            format!("crate-crash-{name}-headers"),
            Script::new(false)
                .data(Side::Request, &conv)
                .data(Side::Response, &h2_frame(1, END_HEADERS, 1, &block))
                .into_bytes(),
        ));
    }
    // pgwire 0.42: panic on `4e 00 00 00 00 4a` (a message whose length is 0).
    let pgwire = [0x4e, 0, 0, 0, 0, 0x4a];
    // postgres-protocol 0.6: tried to allocate 4 GB for a 5-byte input (a length field).
    let bombs: [(&str, [u8; 5]); 3] = [
        ("datarow-4g", [b'D', 0xff, 0xff, 0xff, 0xff]),
        ("error-4g", [b'E', 0xff, 0xff, 0xff, 0xff]),
        ("query-4g", [b'Q', 0x7f, 0xff, 0xff, 0xff]),
    ];
    let mut raw: Vec<(String, Vec<u8>)> = vec![("pgwire-4e0000".into(), pgwire.to_vec())];
    raw.extend(
        bombs
            .iter()
            .map(|(n, b)| (format!("length-bomb-{n}"), b.to_vec())),
    );
    for (name, bytes) in raw {
        for midstream in [false, true] {
            let after_startup = Script::new(midstream)
                .data(Side::Request, &pg_startup("a", "b"))
                .data(Side::Response, &pg_server_hello())
                .data(Side::Request, &bytes)
                .data(Side::Response, &bytes)
                .data(Side::Request, &pg_query("SELECT 1"))
                .data(
                    Side::Response,
                    &[pg_command_complete("SELECT 1"), pg_ready(b'I')].concat(),
                );
            out.push((
                "postgres",
                format!("{name}-midstream{}", u8::from(midstream)),
                after_startup.into_bytes(),
            ));
        }
        out.push((
            "postgres",
            format!("{name}-first"),
            Script::new(false).data(Side::Request, &bytes).into_bytes(),
        ));
    }
    // Length bombs in the other framers: an HTTP/2 frame of 16 MiB, a 2^38-byte read, a
    // huge Content-Length and chunk size.
    out.push((
        "http2",
        "length-bomb-frame".into(),
        Script::new(true)
            .cut(
                Side::Request,
                &[0xff, 0xff, 0xff, 0, 1, 0, 0, 0, 1],
                9,
                255,
                15,
            )
            .into_bytes(),
    ));
    out.push((
        "http1",
        "length-bomb-content-length".into(),
        Script::new(false)
            .data(
                Side::Request,
                b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n",
            )
            .data(
                Side::Response,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            )
            .into_bytes(),
    ));
    out.push((
        "sql",
        "unterminated-dollar".into(),
        b"SELECT $a$ never closed".to_vec(),
    ));
    out.push((
        "detect",
        "short-preface".into(),
        HTTP2_PREFACE[..4].to_vec(),
    ));
    let mut s = vec![0u8];
    tcp_segment(
        &mut s,
        u32::MAX,
        u16::MAX,
        u16::MAX,
        (true, true, false),
        Some(&[0; 16]),
    );
    tcp_segment(
        &mut s,
        0x8000_0000,
        u16::MAX,
        0,
        (false, false, false),
        None,
    );
    out.push(("tcp", "wrap-and-far-ahead".into(), s));
    out
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    fs::create_dir_all(dir).expect("create corpus directory");
    fs::write(dir.join(name), data).expect("write seed");
}

/// Writes the seeds (`fuzz/corpus/<target>/seed-*`) and regression inputs. Run by hand:
/// `cargo test -p probe-protocol --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore]
fn write_seeds() {
    let corpus = fuzz_dir().join("corpus");
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    for (name, s) in decoder_scripts(&http1_conversation()) {
        seeds.push(("http1", name, s));
    }
    for (name, s) in decoder_scripts(&grpc_conversation()) {
        seeds.push(("http2", name, s));
    }
    for (name, s) in decoder_scripts(&pg_conversation()) {
        seeds.push(("postgres", name, s));
    }
    for (name, s) in hpack_seeds() {
        seeds.push(("hpack", name, s));
    }
    for (i, q) in SQL_SAMPLES.iter().enumerate() {
        seeds.push(("sql", format!("sample{i}"), q.as_bytes().to_vec()));
    }
    for (name, s) in detect_seeds() {
        seeds.push(("detect", name, s));
    }
    for (name, s) in tcp_seeds() {
        seeds.push(("tcp", name, s));
    }
    for (target, name, data) in &seeds {
        write(&corpus.join(target), &format!("seed-{name}"), data);
    }
    for (target, name, data) in regressions() {
        write(&fuzz_dir().join("regressions").join(target), &name, &data);
    }
}
