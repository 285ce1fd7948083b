//! Key encoding. A row key is the user id then the surface id, both big-endian, so that
//! byte order is (user, surface) order: one user's rows are one contiguous range (erasure
//! is a range delete) and a sorted batch reads in locality.

use super::RowKey;
use crate::registry::SurfaceId;

/// Length of an encoded row key.
pub const ROW_KEY_LEN: usize = 10;

/// Encodes a row key.
pub fn encode_row_key(key: RowKey) -> [u8; ROW_KEY_LEN] {
    let mut bytes = [0u8; ROW_KEY_LEN];
    bytes[..8].copy_from_slice(&key.user_id.to_be_bytes());
    bytes[8..].copy_from_slice(&key.surface.0.to_be_bytes());
    bytes
}

/// Decodes a row key; `None` unless `bytes` is exactly one encoded key.
pub fn decode_row_key(bytes: &[u8]) -> Option<RowKey> {
    let bytes: &[u8; ROW_KEY_LEN] = bytes.try_into().ok()?;
    let (user, surface) = bytes.split_at(8);
    Some(RowKey {
        user_id: u64::from_be_bytes(user.try_into().ok()?),
        surface: SurfaceId(u16::from_be_bytes(surface.try_into().ok()?)),
    })
}

/// The half-open key range `[start, end)` holding every row of `user_id`.
pub fn user_range(user_id: u64) -> (Vec<u8>, Vec<u8>) {
    let start = user_id.to_be_bytes().to_vec();
    let end = match user_id.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        // The last user's range ends past every 10-byte key that starts with its id.
        None => vec![0xff; ROW_KEY_LEN + 1],
    };
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row_key() -> impl Strategy<Value = RowKey> {
        (any::<u64>(), any::<u16>()).prop_map(|(user_id, surface)| RowKey {
            user_id,
            surface: SurfaceId(surface),
        })
    }

    proptest! {
        #[test]
        fn row_keys_round_trip(key in row_key()) {
            prop_assert_eq!(decode_row_key(&encode_row_key(key)), Some(key));
        }

        #[test]
        fn byte_order_is_user_then_surface_order(a in row_key(), b in row_key()) {
            let by_bytes = encode_row_key(a).cmp(&encode_row_key(b));
            let by_fields = (a.user_id, a.surface).cmp(&(b.user_id, b.surface));
            prop_assert_eq!(by_bytes, by_fields);
        }

        #[test]
        fn a_users_range_holds_exactly_its_rows(user in any::<u64>(), key in row_key()) {
            let (start, end) = user_range(user);
            let encoded = encode_row_key(key).to_vec();
            let inside = encoded >= start && encoded < end;
            prop_assert_eq!(inside, key.user_id == user);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let decoded = decode_row_key(&bytes);
            prop_assert_eq!(decoded.is_some(), bytes.len() == ROW_KEY_LEN);
        }
    }
}
