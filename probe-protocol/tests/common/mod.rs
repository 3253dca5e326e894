//! Valid protocol streams, built with third-party encoders where one exists (postgres-protocol
//! for frontend messages, loona-hpack for header blocks) and by hand otherwise: the seeds of
//! the fuzz corpora (`fuzz_corpus.rs`) and the inputs of the differential tests.
#![allow(dead_code)]

use bakeoff_protocol::hpack::HUFFMAN_CODES;
use bytes::BytesMut;
use postgres_protocol::message::frontend;

// ----- HTTP/1 -----

pub fn http1_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut m = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        m.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        m.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    m.push_str("\r\n");
    let mut m = m.into_bytes();
    m.extend_from_slice(body);
    m
}

pub fn http1_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut m = format!("HTTP/1.1 {status} X\r\n");
    for (k, v) in headers {
        m.push_str(&format!("{k}: {v}\r\n"));
    }
    m.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut m = m.into_bytes();
    m.extend_from_slice(body);
    m
}

pub fn http1_chunked_response(status: u16, chunks: &[&[u8]]) -> Vec<u8> {
    let mut m = format!("HTTP/1.1 {status} OK\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    for c in chunks {
        m.extend(format!("{:x}\r\n", c.len()).into_bytes());
        m.extend_from_slice(c);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\n");
    m
}

// ----- HPACK and HTTP/2 -----

/// RFC 7541 Huffman encoding of `s`.
pub fn huffman_encode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &c in s {
        let (code, len) = HUFFMAN_CODES[usize::from(c)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

/// An HPACK integer with an `n`-bit prefix and the representation's flag bits.
pub fn hpack_int(out: &mut Vec<u8>, n: u8, flags: u8, mut v: u64) {
    let max = (1u64 << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn hpack_str(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
    if huffman {
        let h = huffman_encode(s);
        hpack_int(out, 7, 0x80, h.len() as u64);
        out.extend(h);
    } else {
        hpack_int(out, 7, 0, s.len() as u64);
        out.extend_from_slice(s);
    }
}

/// Header blocks of a conversation, from loona-hpack's encoder (indexed fields and literals
/// with incremental indexing, so later blocks refer to earlier ones).
pub fn loona_blocks(lists: &[Vec<(&str, &str)>]) -> Vec<Vec<u8>> {
    let mut e = loona_hpack::Encoder::new();
    lists
        .iter()
        .map(|l| e.encode(l.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))))
        .collect()
}

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(ty);
    f.push(flags);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A gRPC conversation on one connection, both sides in the order they cross it: unary calls,
/// a failing one, padded and prioritised HEADERS, CONTINUATION, a Trailers-Only answer,
/// RST_STREAM, PING, WINDOW_UPDATE, GOAWAY.
pub fn grpc_conversation() -> Vec<(bool, Vec<u8>)> {
    let mut enc_req = loona_hpack::Encoder::new();
    let mut enc_resp = loona_hpack::Encoder::new();
    let block = |e: &mut loona_hpack::Encoder<'_>, l: &[(&str, &str)]| {
        e.encode(l.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    };
    let mut out = Vec::new();
    let mut client = bakeoff_protocol::http2::PREFACE.to_vec();
    client.extend(h2_frame(4, 0, 0, &[0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0]));
    out.push((false, client));
    let mut server = h2_frame(4, 0, 0, &[0, 1, 0, 0, 0x10, 0]);
    server.extend(h2_frame(4, 1, 0, &[]));
    out.push((true, server));
    out.push((false, h2_frame(4, 1, 0, &[])));
    let message = [&[0u8, 0, 0, 0, 5][..], b"hello"].concat();
    let methods = [
        "/shop.Cart/Add",
        "/shop.Cart/Get",
        "/shop.Cart/Fail",
        "/shop.Cart/Add",
    ];
    for (i, path) in methods.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let id = format!("req-{i}");
        let b = block(
            &mut enc_req,
            &[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "cart:50051"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("x-request-id", &id),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ],
        );
        let mut req = if i == 1 {
            // Padded, with a priority, split over a CONTINUATION.
            let (a, c) = b.split_at(b.len() / 2);
            let mut p = vec![3u8];
            p.extend([0x80, 0, 0, 1, 15]);
            p.extend_from_slice(a);
            p.extend([0, 0, 0]);
            let mut f = h2_frame(1, PADDED | PRIORITY, stream, &p);
            f.extend(h2_frame(9, END_HEADERS, stream, c));
            f
        } else {
            h2_frame(1, END_HEADERS, stream, &b)
        };
        req.extend(h2_frame(0, END_STREAM, stream, &message));
        out.push((false, req));
        let resp = if i == 2 {
            // Trailers-Only.
            let b = block(
                &mut enc_resp,
                &[
                    (":status", "200"),
                    ("content-type", "application/grpc"),
                    ("grpc-status", "5"),
                    ("grpc-message", "not found"),
                ],
            );
            h2_frame(1, END_HEADERS | END_STREAM, stream, &b)
        } else {
            let b = block(
                &mut enc_resp,
                &[(":status", "200"), ("content-type", "application/grpc")],
            );
            let mut r = h2_frame(1, END_HEADERS, stream, &b);
            r.extend(h2_frame(0, 0, stream, &message));
            let t = block(&mut enc_resp, &[("grpc-status", "0")]);
            r.extend(h2_frame(1, END_HEADERS | END_STREAM, stream, &t));
            r
        };
        out.push((true, resp));
    }
    // A stream reset by the client, PING, WINDOW_UPDATE, GOAWAY.
    let b = block(
        &mut enc_req,
        &[(":method", "GET"), (":scheme", "https"), (":path", "/slow")],
    );
    let mut req = h2_frame(1, END_HEADERS | END_STREAM, 9, &b);
    req.extend(h2_frame(3, 0, 9, &8u32.to_be_bytes()));
    req.extend(h2_frame(6, 0, 0, &[1; 8]));
    req.extend(h2_frame(8, 0, 0, &1000u32.to_be_bytes()));
    out.push((false, req));
    let mut resp = h2_frame(6, 1, 0, &[1; 8]);
    let mut goaway = 9u32.to_be_bytes().to_vec();
    goaway.extend(0u32.to_be_bytes());
    goaway.extend_from_slice(b"bye");
    resp.extend(h2_frame(7, 0, 0, &goaway));
    out.push((true, resp));
    out
}

// ----- Postgres -----

pub fn pg_msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend((body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn buf(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    f(&mut b);
    b.to_vec()
}

pub fn pg_startup(user: &str, database: &str) -> Vec<u8> {
    buf(|b| {
        frontend::startup_message([("user", user), ("database", database)], b)
            .expect("startup message")
    })
}

pub fn pg_ssl_request() -> Vec<u8> {
    buf(frontend::ssl_request)
}

pub fn pg_query(sql: &str) -> Vec<u8> {
    buf(|b| frontend::query(sql, b).expect("query"))
}

pub fn pg_parse(name: &str, sql: &str) -> Vec<u8> {
    buf(|b| frontend::parse(name, sql, [], b).expect("parse"))
}

pub fn pg_bind(portal: &str, statement: &str, params: &[&str]) -> Vec<u8> {
    buf(|b| {
        frontend::bind(
            portal,
            statement,
            [0i16],
            params.iter(),
            |p, out| {
                out.extend_from_slice(p.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            [0i16],
            b,
        )
        .map_err(|_| ())
        .expect("bind")
    })
}

pub fn pg_describe_portal(portal: &str) -> Vec<u8> {
    buf(|b| frontend::describe(b'P', portal, b).expect("describe"))
}

pub fn pg_execute(portal: &str, max_rows: i32) -> Vec<u8> {
    buf(|b| frontend::execute(portal, max_rows, b).expect("execute"))
}

pub fn pg_sync() -> Vec<u8> {
    buf(frontend::sync)
}

pub fn pg_terminate() -> Vec<u8> {
    buf(frontend::terminate)
}

pub fn pg_password(p: &str) -> Vec<u8> {
    buf(|b| frontend::password_message(p.as_bytes(), b).expect("password"))
}

fn cstrs(parts: &[&[u8]]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(p);
        b.push(0);
    }
    b
}

/// The server's answer to a startup: AuthenticationOk, a ParameterStatus, BackendKeyData,
/// ReadyForQuery.
pub fn pg_server_hello() -> Vec<u8> {
    [
        pg_msg(b'R', &0u32.to_be_bytes()),
        pg_msg(b'S', &cstrs(&[b"server_version", b"15.8"])),
        pg_msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]),
        pg_ready(b'I'),
    ]
    .concat()
}

pub fn pg_ready(state: u8) -> Vec<u8> {
    pg_msg(b'Z', &[state])
}

pub fn pg_row_description(columns: &[&str]) -> Vec<u8> {
    let mut b = (columns.len() as u16).to_be_bytes().to_vec();
    for c in columns {
        b.extend_from_slice(c.as_bytes());
        b.push(0);
        b.extend([0; 18]);
    }
    pg_msg(b'T', &b)
}

pub fn pg_data_row(values: &[&[u8]]) -> Vec<u8> {
    let mut b = (values.len() as u16).to_be_bytes().to_vec();
    for v in values {
        b.extend((v.len() as u32).to_be_bytes());
        b.extend_from_slice(v);
    }
    pg_msg(b'D', &b)
}

pub fn pg_command_complete(tag: &str) -> Vec<u8> {
    pg_msg(b'C', &cstrs(&[tag.as_bytes()]))
}

pub fn pg_error(code: &str, message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
    ] {
        b.push(k);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    pg_msg(b'E', &b)
}

/// A Postgres conversation, both sides in the order they cross the connection: SSLRequest
/// refused, startup, simple queries (one with two statements, one failing), an extended
/// query pipeline with an error in the middle, COPY, PortalSuspended, a notice.
pub fn pg_conversation() -> Vec<(bool, Vec<u8>)> {
    let mut out = vec![
        (false, pg_ssl_request()),
        (true, b"N".to_vec()),
        (false, pg_startup("alice", "shop")),
        (true, pg_server_hello()),
        (false, pg_query("SELECT id, name FROM items WHERE id = 42")),
        (
            true,
            [
                pg_row_description(&["id", "name"]),
                pg_data_row(&[b"42", b"lamp"]),
                pg_command_complete("SELECT 1"),
                pg_ready(b'I'),
            ]
            .concat(),
        ),
        (
            false,
            pg_query("BEGIN; UPDATE items SET stock = stock - 1 WHERE id = 7"),
        ),
        (
            true,
            [
                pg_command_complete("BEGIN"),
                pg_command_complete("UPDATE 1"),
                pg_ready(b'T'),
            ]
            .concat(),
        ),
        (false, pg_query("SELECT 1/0")),
        (
            true,
            [pg_error("22012", "division by zero"), pg_ready(b'E')].concat(),
        ),
    ];
    let pipeline = [
        pg_parse("s1", "INSERT INTO orders (item, qty) VALUES ($1, $2)"),
        pg_bind("", "s1", &["7", "1"]),
        pg_describe_portal(""),
        pg_execute("", 0),
        pg_bind("", "s1", &["7", "x"]),
        pg_execute("", 0),
        pg_bind("", "s1", &["8", "2"]),
        pg_execute("", 0),
        pg_sync(),
    ]
    .concat();
    out.push((false, pipeline));
    out.push((
        true,
        [
            pg_msg(b'1', &[]),
            pg_msg(b'2', &[]),
            pg_msg(b'n', &[]),
            pg_command_complete("INSERT 0 1"),
            pg_msg(b'2', &[]),
            pg_error("22P02", "invalid input syntax for type integer"),
            pg_ready(b'I'),
        ]
        .concat(),
    ));
    out.push((
        false,
        [
            pg_parse("", "SELECT * FROM items"),
            pg_bind("c", "", &[]),
            pg_execute("c", 2),
            pg_sync(),
        ]
        .concat(),
    ));
    out.push((
        true,
        [
            pg_msg(b'1', &[]),
            pg_msg(b'2', &[]),
            pg_data_row(&[b"1"]),
            pg_data_row(&[b"2"]),
            pg_msg(b's', &[]),
            pg_msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0"),
            pg_ready(b'T'),
        ]
        .concat(),
    ));
    out.push((false, pg_query("COPY items FROM STDIN")));
    out.push((true, pg_msg(b'G', &[0, 0, 1, 0, 0])));
    out.push((
        false,
        [
            pg_msg(b'd', b"1\tlamp\n"),
            pg_msg(b'd', b"2\tdesk\n"),
            pg_msg(b'c', &[]),
        ]
        .concat(),
    ));
    out.push((
        true,
        [pg_command_complete("COPY 2"), pg_ready(b'I')].concat(),
    ));
    out.push((false, pg_terminate()));
    out
}

// ----- SQL -----

pub const SQL_SAMPLES: &[&str] = &[
    "SELECT id, name FROM items WHERE id = 42 AND name = 'lamp'",
    "select * from t where a in (1, 2, 3) and b = any(array[4,5])",
    "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z') RETURNING id",
    "UPDATE accounts SET balance = balance - 10.5e3 WHERE id = $1",
    "WITH x AS (SELECT 1) DELETE FROM t USING x WHERE t.id = x.id",
    "/*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/ SELECT 1",
    "SELECT $$dollar ' quoted$$, $tag$x$tag$, E'esc\\'aped', B'0101', X'ff', U&'d\\0061t'",
    "CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 1 END; END; SELECT 2",
    "BEGIN; SELECT \"Quoted Ident\" FROM \"T\" -- comment\n; COMMIT",
    "SELECT 'unterminated",
    "SELECT /* unterminated comment",
    "SELECT -1, +2, 3.5, .5, 1e-3, 0x1F, 'a' 'b'",
    "",
    ";;;",
];

// ----- TCP segments (the `tcp` harness's script) -----

/// A TCP harness op for one segment.
pub fn tcp_segment(
    out: &mut Vec<u8>,
    seq: u32,
    len: u16,
    captured: u16,
    flags: (bool, bool, bool),
    payload: Option<&[u8]>,
) {
    let (syn, fin, rst) = flags;
    out.push(u8::from(syn) << 4 | u8::from(fin) << 5 | u8::from(rst) << 6);
    out.extend(seq.to_be_bytes());
    out.extend(len.to_be_bytes());
    out.extend(captured.to_be_bytes());
    if let Some(p) = payload {
        out.extend_from_slice(&p[..p.len().min(usize::from(captured.min(len)))]);
    }
}
