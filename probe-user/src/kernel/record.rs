//! Decoding ring-buffer records. The kernel writes `#[repr(C)]` structs from `probe-common`;
//! every read here checks the length first, so a short or unknown record is an error, not a
//! crash.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use probe_common::{
    ConnEvent, DataHeader, EventHeader, EventKind, ProcEvent, ReleaseEvent, SegmentHeader,
    TlsHeader,
};

/// A decoded kernel event; `Data` borrows its payload from the ring buffer.
#[derive(Debug)]
pub enum Record<'a> {
    Proc(EventKind, ProcEvent),
    Conn(ConnEvent),
    Close(ConnEvent),
    Data(DataHeader, &'a [u8]),
    Segment(SegmentHeader, &'a [u8]),
    Release(ReleaseEvent),
    Tls(TlsHeader, &'a [u8]),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of {0} bytes is too short")]
    Short(usize),
    #[error("unknown record kind {0}")]
    Kind(u32),
    #[error("data record claims {claimed} payload bytes but carries {carried}")]
    Payload { claimed: u32, carried: usize },
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() < size_of::<T>() {
        return Err(RecordError::Short(bytes.len()));
    }
    // SAFETY: length checked; T is a plain-old-data repr(C) type; read_unaligned tolerates any
    // alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one record.
pub fn decode(bytes: &[u8]) -> Result<Record<'_>, RecordError> {
    let header: EventHeader = read(bytes)?;
    let kind = EventKind::from_u32(header.kind).ok_or(RecordError::Kind(header.kind))?;
    Ok(match kind {
        EventKind::Exec | EventKind::Fork | EventKind::Exit => Record::Proc(kind, read(bytes)?),
        EventKind::Conn => Record::Conn(read(bytes)?),
        EventKind::Close => Record::Close(read(bytes)?),
        EventKind::Data => {
            let h: DataHeader = read(bytes)?;
            let payload = &bytes[size_of::<DataHeader>()..];
            if payload.len() < h.captured as usize {
                return Err(RecordError::Payload {
                    claimed: h.captured,
                    carried: payload.len(),
                });
            }
            Record::Data(h, &payload[..h.captured as usize])
        }
        EventKind::Segment => {
            let h: SegmentHeader = read(bytes)?;
            let payload = &bytes[size_of::<SegmentHeader>()..];
            if payload.len() < h.captured as usize || h.captured > h.len {
                return Err(RecordError::Payload {
                    claimed: h.captured,
                    carried: payload.len(),
                });
            }
            Record::Segment(h, &payload[..h.captured as usize])
        }
        EventKind::Release => Record::Release(read(bytes)?),
        EventKind::Tls => {
            let h: TlsHeader = read(bytes)?;
            let payload = &bytes[size_of::<TlsHeader>()..];
            if payload.len() < h.captured as usize || u64::from(h.captured) > h.len {
                return Err(RecordError::Payload {
                    claimed: h.captured,
                    carried: payload.len(),
                });
            }
            Record::Tls(h, &payload[..h.captured as usize])
        }
    })
}

/// The local and remote addresses of a segment record.
pub fn segment_addrs(h: &SegmentHeader) -> (SocketAddr, SocketAddr) {
    let ip = |a: &[u8; 16]| -> IpAddr {
        if h.family == 10 {
            let v6 = Ipv6Addr::from(*a);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        } else {
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        }
    };
    (
        SocketAddr::new(ip(&h.local_addr), h.local_port),
        SocketAddr::new(ip(&h.remote_addr), h.remote_port),
    )
}

/// The peer address of a connection event, when the kernel had it.
pub fn peer(e: &ConnEvent) -> Option<SocketAddr> {
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    let ip = match e.family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3])),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(e.addr);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, e.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over repr(C) POD.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(decode(&[1, 2, 3]).unwrap_err(), RecordError::Short(3));
        let h = EventHeader {
            kind: 99,
            tgid: 1,
            ts_ns: 2,
        };
        assert_eq!(decode(&as_bytes(&h)).unwrap_err(), RecordError::Kind(99));
        let h = EventHeader {
            kind: EventKind::Conn as u32,
            tgid: 1,
            ts_ns: 2,
        };
        assert!(matches!(decode(&as_bytes(&h)), Err(RecordError::Short(16))));
    }

    #[test]
    fn data_record_payload_is_bounded_by_captured() {
        let h = DataHeader {
            header: EventHeader {
                kind: EventKind::Data as u32,
                tgid: 7,
                ts_ns: 9,
            },
            captured: 3,
            len: 10,
            ..DataHeader::default()
        };
        let mut bytes = as_bytes(&h);
        bytes.extend_from_slice(b"GET");
        match decode(&bytes).unwrap() {
            Record::Data(h, payload) => {
                assert_eq!(payload, b"GET");
                assert_eq!(h.len, 10);
            }
            other => panic!("{other:?}"),
        }
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(decode(&bytes), Err(RecordError::Payload { .. })));
    }
}
