//! Stored bytes: any bytes read as a row key, a user state, or a row (owned decode, the
//! read path's in-place view, the merge operator) never panic; the view and the owned
//! decode agree on every row; a decoded row encodes and decodes back to itself.
#![no_main]

use featurestore_server::storage::codec::{
    RowView, decode_row, decode_user_state, encode_row, merge_operands,
};
use featurestore_server::storage::keys::decode_row_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
        if let (Ok(viewed), Ok(owned)) = (&viewed, &owned) {
            assert_eq!(viewed, owned, "the in-place view reads what the decoder reads");
        }
    }
    if let Ok(row) = owned {
        let again = decode_row(&encode_row(&row)).expect("an encoded row decodes");
        assert_eq!(again, row);
    }
});
