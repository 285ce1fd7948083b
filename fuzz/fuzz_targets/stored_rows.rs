//! Stored bytes: any bytes read as a row key, a user state, or a row (owned decode, the
//! read path's in-place view, the merge operator) never panic; the view and the owned
//! decode agree on every row; a decoded row encodes and decodes back to itself. Each input
//! is tried as it is and with a valid checksum appended, so that the fuzzer reaches the
//! parsing behind the checksum (damage that passes it is what the decoder must survive).
#![no_main]

use featurestore_server::storage::codec::{
    RowView, decode_row, decode_user_state, encode_row, merge_operands,
};
use featurestore_server::storage::keys::decode_row_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut checksummed = data.to_vec();
    checksummed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    check(&checksummed);
});

fn check(data: &[u8]) {
    let _ = decode_row_key(data);
    let _ = decode_user_state(7, data);
    let _ = merge_operands([data]);
    let owned = decode_row(data);
    if let Ok(view) = RowView::parse(data) {
        let mut values_ok = true;
        for value in view.values() {
            match value {
                Ok(value) => {
                    let _ = view.provenance(value.provenance);
                }
                Err(_) => values_ok = false,
            }
        }
        let viewed = view.to_row();
        assert_eq!(viewed.is_ok(), values_ok, "to_row checks what values() checks");
        // Compared as encodings: a float may be NaN, which equals nothing.
        if let (Ok(viewed), Ok(owned)) = (&viewed, &owned) {
            assert_eq!(
                encode_row(viewed),
                encode_row(owned),
                "the in-place view reads what the decoder reads"
            );
        }
    }
    if let Ok(row) = owned {
        let encoded = encode_row(&row);
        let again = decode_row(&encoded).expect("an encoded row decodes");
        assert_eq!(encode_row(&again), encoded, "a decoded row encodes back to itself");
    }
}
