//! `user_data` of every SQE: what the operation is, which connection (or
//! listener) it belongs to, and that connection's generation.
//!
//! Layout: kind in the top 8 bits, index in the next 24, generation in the
//! low 32. A completion whose generation does not match the record at its
//! index is stale (the record was reused) and is only allowed to hand back
//! its buffer.
//!
//! Must not: carry pointers. Pure arithmetic, tested below.

/// What an SQE does; decides how its completion is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Multishot accept; index = listener.
    Accept = 1,
    /// Multishot recv from the provided buffer ring; index = connection.
    Recv = 2,
    /// One send of a connection's output; index = connection.
    Send = 3,
    /// Multishot poll on the spool waker's eventfd.
    Wake = 4,
    /// An `AsyncCancel`; its completion carries nothing we need.
    Cancel = 5,
}

/// Largest index that fits in 24 bits.
pub const INDEX_MAX: u32 = (1 << 24) - 1;

/// Packs (kind, index, generation) into a `user_data`.
pub fn encode(kind: Kind, index: u32, generation: u32) -> u64 {
    assert!(index <= INDEX_MAX, "index {index} does not fit in 24 bits");
    ((kind as u64) << 56) | ((index as u64) << 32) | generation as u64
}

/// Unpacks a `user_data`; `None` for a kind we never submit.
pub fn decode(user_data: u64) -> Option<(Kind, u32, u32)> {
    let kind = match (user_data >> 56) as u8 {
        1 => Kind::Accept,
        2 => Kind::Recv,
        3 => Kind::Send,
        4 => Kind::Wake,
        5 => Kind::Cancel,
        _ => return None,
    };
    let index = ((user_data >> 32) as u32) & INDEX_MAX;
    Some((kind, index, user_data as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_the_edges() {
        for kind in [
            Kind::Accept,
            Kind::Recv,
            Kind::Send,
            Kind::Wake,
            Kind::Cancel,
        ] {
            for index in [0, 1, 4095, INDEX_MAX] {
                for generation in [0, 1, 0x8000_0000, u32::MAX] {
                    let ud = encode(kind, index, generation);
                    assert_eq!(decode(ud), Some((kind, index, generation)));
                }
            }
        }
    }

    #[test]
    fn fields_do_not_overlap() {
        let a = encode(Kind::Recv, INDEX_MAX, u32::MAX);
        let b = encode(Kind::Send, INDEX_MAX, u32::MAX);
        assert_ne!(a, b, "kind is kept apart from index and generation");
        assert_ne!(
            encode(Kind::Recv, 7, 1),
            encode(Kind::Recv, 7, 2),
            "a reused slot has another user_data"
        );
    }

    #[test]
    fn unknown_kinds_are_refused() {
        assert_eq!(decode(0), None);
        assert_eq!(decode(0xff << 56), None);
    }

    #[test]
    #[should_panic(expected = "24 bits")]
    fn index_overflow_is_a_bug() {
        encode(Kind::Recv, INDEX_MAX + 1, 0);
    }
}
