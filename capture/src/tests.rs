use proptest::prelude::*;

use super::*;

fn meta() -> Meta {
    Meta {
        experiment: "e".into(),
        cohort: "canary".into(),
        protocol: "http1".into(),
        started_unix_ns: 1,
        redaction: vec!["header:authorization".into()],
        attributes: Default::default(),
    }
}

fn sample(n: usize) -> Vec<Record> {
    let mut out = vec![Record::open(
        7,
        10,
        &ConnInfo {
            role: "server".into(),
            protocol: "http1".into(),
            peer: Some("10.0.0.1:4000".into()),
            pid: 42,
            midstream: false,
            attributes: Default::default(),
        },
    )];
    for i in 0..n {
        let body = format!("GET /item/{i} HTTP/1.1\r\nHost: x\r\n\r\n").repeat(1 + i % 50);
        out.push(Record::data(
            7,
            Direction::Ingress,
            100 + i as u64,
            body.into_bytes(),
        ));
    }
    out.push(Record::loss(
        7,
        Direction::Egress,
        5000,
        &Loss {
            bytes: 12,
            reason: "ring_full".into(),
        },
    ));
    out.push(Record::close(7, 6000));
    out
}

fn write(records: &[Record]) -> Vec<u8> {
    let mut w = CaptureWriter::new(Vec::new(), &meta()).unwrap();
    for r in records {
        w.write(r).unwrap();
    }
    w.finish().unwrap()
}

fn read_all(bytes: &[u8]) -> (Vec<Record>, Option<CaptureError>) {
    let reader = match CaptureReader::new(bytes) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut out = Vec::new();
    for r in reader {
        match r {
            Ok(r) => out.push(r),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

#[test]
fn records_round_trip_across_blocks() {
    let records = sample(3000);
    let bytes = write(&records);
    let reader = CaptureReader::new(&bytes[..]).unwrap();
    assert_eq!(reader.meta(), &meta());
    let (back, err) = read_all(&bytes);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(back, records);
    assert_eq!(back[0].conn_info().unwrap().pid, 42);
    assert_eq!(back[back.len() - 2].loss_info().unwrap().bytes, 12);
    // Several blocks, and compressed.
    let raw: usize = records.iter().map(|r| RECORD_HEADER + r.body.len()).sum();
    assert!(raw > 3 * BLOCK_BYTES, "{raw}");
    assert!(bytes.len() < raw / 5, "{} of {raw}", bytes.len());
}

#[test]
fn a_cut_file_is_read_up_to_the_cut() {
    let records = sample(3000);
    let bytes = write(&records);
    // Every cut after the header: the records before it, then `Truncated`, never a panic or
    // a wrong record.
    let step = (bytes.len() / 300).max(1);
    let header = 28 + u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]) as usize;
    for cut in (header..bytes.len())
        .step_by(step)
        .chain([header + 5, bytes.len() - 1])
    {
        let (back, err) = read_all(&bytes[..cut]);
        assert!(
            matches!(err, Some(CaptureError::Truncated { records, .. }) if records == back.len() as u64),
            "cut at {cut}: {err:?}"
        );
        assert_eq!(back[..], records[..back.len()], "cut at {cut}");
    }
    // A cut inside the header is a header error.
    assert!(matches!(
        read_all(&bytes[..20]).1,
        Some(CaptureError::Header(_))
    ));
    assert!(matches!(
        read_all(&bytes[..10]).1,
        Some(CaptureError::BadMagic)
    ));
}

#[test]
fn damage_is_found_and_located() {
    let records = sample(3000);
    let bytes = write(&records);
    for at in [200, bytes.len() / 2, bytes.len() - 30] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x40;
        let (back, err) = read_all(&bad);
        assert!(err.is_some(), "a flipped bit at {at} went unnoticed");
        assert_eq!(back[..], records[..back.len()], "flip at {at}");
        let text = err.unwrap().to_string();
        assert!(text.contains("byte") || text.contains("header"), "{text}");
    }
    let mut newer = bytes.clone();
    newer[16] = 9;
    assert!(matches!(read_all(&newer).1, Some(CaptureError::Version(9))));
}

#[test]
fn a_capture_in_progress_is_readable_so_far() {
    let mut w = CaptureWriter::new(Vec::new(), &meta()).unwrap();
    for r in sample(10) {
        w.write(&r).unwrap();
    }
    w.flush().unwrap();
    let written = w.records();
    let bytes = w.finish().unwrap();
    // Without the end marker (as a reader sees the file while it grows).
    let (back, err) = read_all(&bytes[..bytes.len() - 20]);
    assert_eq!(back.len() as u64, written);
    assert!(matches!(err, Some(CaptureError::Truncated { .. })));
}

proptest! {
    /// Any records round-trip; any bytes after a valid header never panic the reader.
    #[test]
    fn round_trip_and_garbage(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..40),
        garbage in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let records: Vec<Record> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| Record::data(i as u64 % 3, Direction::Egress, i as u64, b))
            .collect();
        let bytes = write(&records);
        let (back, err) = read_all(&bytes);
        prop_assert!(err.is_none());
        prop_assert_eq!(back, records);
        let mut header_only = write(&[]);
        header_only.truncate(header_only.len() - 20);
        header_only.extend_from_slice(&garbage);
        let _ = read_all(&header_only);
    }
}
