//! `cargo xtask bench parsers`: what each protocol decoder sustains on one core, on generated
//! conversations fed as a connection's pieces (whole payloads captured): MB/s of wire bytes and
//! calls/s. Pure user-space work, no kernel.

use std::time::Instant;

use bakeoff_probe::protocol::{
    Call, Decoder, Http1Exchange, exchange::Anomaly, http1::Side, http2::Http2Exchange,
    postgres::PostgresExchange,
};

/// A conversation: pieces in the order they cross the connection.
type Script = Vec<(Side, Vec<u8>)>;

/// A fresh decoder of one protocol.
type NewDecoder = fn() -> Box<dyn Decoder>;

fn http1(calls: usize) -> Script {
    let mut out = Vec::new();
    for i in 0..calls {
        out.push((
            Side::Request,
            format!(
                "GET /api/items/{} HTTP/1.1\r\nHost: shop\r\nUser-Agent: bench/1.0\r\n\
                 x-request-id: r-{i}\r\n\r\n",
                i % 50
            )
            .into_bytes(),
        ));
        let mut resp =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                .to_vec();
        resp.extend_from_slice(&[b'x'; 100]);
        out.push((Side::Response, resp));
    }
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK block of literal fields without indexing (new names, no Huffman): what a decoder
/// must handle whatever its table holds.
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0x00);
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    }
    b
}

fn grpc(calls: usize) -> Script {
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;
    let mut client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    client.extend(frame(4, 0, 0, &[]));
    let mut out = vec![
        (Side::Request, client),
        (Side::Response, frame(4, 0, 0, &[])),
    ];
    let message = [&[0u8, 0, 0, 0, 100][..], &[b'x'; 100]].concat();
    for i in 0..calls {
        let stream = 1 + 2 * i as u32;
        let id = format!("r-{i}");
        let mut req = frame(
            1,
            END_HEADERS,
            stream,
            &block(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/bench.Echo/Fast"),
                (":authority", "echo:50051"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("x-request-id", &id),
            ]),
        );
        req.extend(frame(0, END_STREAM, stream, &message));
        out.push((Side::Request, req));
        let mut resp = frame(
            1,
            END_HEADERS,
            stream,
            &block(&[(":status", "200"), ("content-type", "application/grpc")]),
        );
        resp.extend(frame(0, 0, stream, &message));
        resp.extend(frame(
            1,
            END_HEADERS | END_STREAM,
            stream,
            &block(&[("grpc-status", "0")]),
        ));
        out.push((Side::Response, resp));
    }
    out
}

fn pg_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn postgres(calls: usize) -> Script {
    let params = b"user\0bench\0database\0shop\0\0";
    let mut startup = (8 + params.len() as u32).to_be_bytes().to_vec();
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    startup.extend_from_slice(params);
    let mut ready = pg_message(b'R', &0u32.to_be_bytes());
    ready.extend(pg_message(b'Z', b"I"));
    let mut out = vec![(Side::Request, startup), (Side::Response, ready)];
    for i in 0..calls {
        let sql = format!("SELECT payload FROM items WHERE id = {}\0", i % 1000);
        out.push((Side::Request, pg_message(b'Q', sql.as_bytes())));
        let mut row_description = 1u16.to_be_bytes().to_vec();
        row_description.extend_from_slice(b"payload\0");
        row_description.extend_from_slice(&[0; 18]);
        let mut data_row = 1u16.to_be_bytes().to_vec();
        data_row.extend_from_slice(&32u32.to_be_bytes());
        data_row.extend_from_slice(&[b'p'; 32]);
        let mut resp = pg_message(b'T', &row_description);
        resp.extend(pg_message(b'D', &data_row));
        resp.extend(pg_message(b'C', b"SELECT 1\0"));
        resp.extend(pg_message(b'Z', b"I"));
        out.push((Side::Response, resp));
    }
    out
}

/// Feeds `script` to a fresh decoder `rounds` times: (MB/s, calls/s, calls per round).
fn measure(script: &Script, rounds: usize, new: fn() -> Box<dyn Decoder>) -> (f64, f64, usize) {
    let bytes: usize = script.iter().map(|(_, b)| b.len()).sum();
    let mut calls = 0usize;
    let mut done: Vec<Call> = Vec::new();
    let mut anomalies: Vec<Anomaly> = Vec::new();
    let started = Instant::now();
    for _ in 0..rounds {
        let mut decoder = new();
        for (i, (side, piece)) in script.iter().enumerate() {
            decoder.on_bytes(
                *side,
                i as u64,
                piece,
                piece.len() as u64,
                &mut done,
                &mut anomalies,
            );
            calls += done.len();
            done.clear();
            anomalies.clear();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    (
        (bytes * rounds) as f64 / seconds / 1e6,
        calls as f64 / seconds,
        calls / rounds.max(1),
    )
}

fn main() {
    const CALLS: usize = 10_000;
    const ROUNDS: usize = 20;
    println!(
        "bakeoff parser benchmark: one core, {CALLS} calls per conversation, {ROUNDS} rounds, \
         whole payloads captured\n"
    );
    println!(
        "{:<10} {:>10} {:>12} {:>12}",
        "protocol", "MB/s", "calls/s", "calls/round"
    );
    let cases: [(&str, Script, NewDecoder); 3] = [
        ("http1", http1(CALLS), || Box::new(Http1Exchange::new())),
        ("grpc", grpc(CALLS), || Box::new(Http2Exchange::new(false))),
        ("postgres", postgres(CALLS), || {
            Box::new(PostgresExchange::new(false))
        }),
    ];
    let mut incomplete = false;
    for (name, script, new) in cases {
        let (mbs, calls_per_s, per_round) = measure(&script, ROUNDS, new);
        println!("{name:<10} {mbs:>10.1} {calls_per_s:>12.0} {per_round:>12}");
        incomplete |= per_round != CALLS;
    }
    println!(
        "\nhttp1: GET with 3 headers and a request id, 100-byte bodies. grpc: unary calls on one \
         connection, literal HPACK fields (no table, no Huffman), 100-byte messages, trailers. \
         postgres: simple query, one row of 32 bytes."
    );
    if incomplete {
        eprintln!("error: a decoder did not report every call (see calls/round)");
        std::process::exit(1);
    }
}
